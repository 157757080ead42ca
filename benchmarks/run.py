"""Tollgate's benchmark: one command, real processes, ratios measured in one run.

``python3 scripts/dev.py bench [--smoke]`` (which finds PostgreSQL and Redis as ``test``
does and installs wrk) runs ``python -m benchmarks.run --database-url … --redis-url …``:

1. A fresh database (created, migrated with ``tollgate migrate``, dropped at the end) and
   queue names of its own in Redis (its keys are deleted at the end; Redis is never flushed).
2. HTTP paths, each driven by wrk (``-t1 -c32``, ``--duration`` seconds, after a short
   warm-up): the bare litestar endpoint (``benchmarks/bare.py``, served by the same
   ``gateway.server.run`` as the gateway), ``/healthz``, ``GET /v1/models``,
   ``POST /v1/images/generations`` from one tenant and spread over 50, and
   ``GET /v1/tasks/{id}`` of a pending and of a completed task; then submits from one
   tenant at half the rate wrk reached, evenly spaced (``benchmarks/paced.py``: wrk has no
   fixed rate), for the latency at half load. Limits are on (rates so high
   that they never refuse), so their cost is counted. Before each path the bare endpoint
   is measured again, and the path's ratio is to that run: on a shared machine the load
   moves within a minute. The CPU time the server's processes spent per request is
   measured too (``/proc``): its ratio to the bare endpoint's is what the throughput
   ratio would be if each had a CPU to itself, which a loaded machine never gives.
3. A worker: the tasks the HTTP paths left open are failed first, as the deadline sweeper
   would (``end_http_tasks``), so that the worker runs its batch alone. Then
   ``--tasks`` tasks (with a callback URL) submitted while no worker runs, then one
   ``tollgate-worker`` against the simulator at latency 0 (``--latency``): tasks/s from the
   first job's start to the last task completed with its image stored; over the batch past
   its first tenth, the worker process's CPU time per task and its generation job runs per
   task (a run that parks for an upstream slot ends, and runs again once handed one). Then,
   with the worker idle, tasks submitted one by one at a steady pace: submit → job start
   (``created_at`` → ``started_at``), p50 and p99.
4. Callbacks: one ``tollgate-worker --callbacks`` delivers every finished task's callback
   to a real HTTPS receiver on loopback (``benchmarks/receiver.py``): deliveries/s.
5. RSS of the gateway, the worker and the callback worker, early and at the end of their load.
6. Waiting requests (``benchmarks/waiters.py``, its own database and gateway process):
   ``--waiters`` long-polls (``Prefer: wait=60``) at once on one gateway, their memory,
   the database connections they use while they wait, and how long after their tasks'
   ends they are answered. ``--waiters 0`` leaves this step out.

It prints a table and then the same figures as JSON (``--json PATH`` writes them too).
Absolute figures depend on the machine and on what else runs there; the ratios to the bare
endpoint, measured minutes apart in the same run, are what to compare across machines.
``--smoke`` runs every step for about a second with a handful of tasks: it proves the
benchmark works (the test suite runs it) and measures nothing worth keeping.
"""

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis import Redis
from sqlalchemy.engine import make_url

from benchmarks.receiver import Receiver, make_cert

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL_BODY = {"model": "flux-1-schnell", "prompt": "a lighthouse at dawn", "size": "512x512"}
TENANTS = 50
SIM_KEY = "bench-sim-key"


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plain_url(url: str) -> str:
    """A URL asyncpg understands (no +asyncpg driver suffix)."""
    rendered = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return str(rendered)


# --- processes --------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class Run:
    workdir: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env or self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
            try:
                proc.popen.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is not None:
                tail = proc.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail}")


def wait_http(run: Run, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (uvicorn's workers), KiB."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending += [int(child) for child in children]
    return total


# --- wrk --------------------------------------------------------------------------------

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,'
    .. '"non_2xx":%d,"socket_errors":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def wrk_script(method: str, path: str, keys: list[str], body: dict[str, Any] | None = None) -> str:
    """A wrk script cycling through ``keys`` (one Authorization per request)."""
    lines = [f"local keys = {{{', '.join(_lua_string(k) for k in keys)}}}", "local i = 0"]
    payload = _lua_string(json.dumps(body)) if body is not None else "nil"
    lines += [
        "request = function()",
        "  i = i % #keys + 1",
        "  local headers = {}",
        '  if keys[i] ~= "" then headers["Authorization"] = "Bearer " .. keys[i] end',
        "  if " + payload + ' then headers["Content-Type"] = "application/json" end',
        f"  return wrk.format({_lua_string(method)}, {_lua_string(path)}, headers, {payload})",
        "end",
    ]
    return "\n".join(lines) + _DONE


@dataclass
class Load:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    cpu_ms_per_request: float | None = None  # of the server's processes, when given
    # Of this machine's PostgreSQL and Redis servers, and of all its cores (the load
    # generator's, the servers', anything else's): where a request's CPU goes besides.
    stores_cpu_ms_per_request: float | None = None
    machine_cpu_ms_per_request: float | None = None


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(process: Path) -> tuple[str, list[str]]:
    """A process's name and the fields of its ``/proc/<pid>/stat`` after the name (the
    name is in parentheses and may hold spaces)."""
    stat = (process / "stat").read_text()
    name, _, rest = stat[stat.index("(") + 1 :].rpartition(")")
    return name, rest.split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants so far, seconds."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            _, fields = _stat(Path(f"/proc/{current}"))
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
    return total / _TICK


def stores_cpu_seconds() -> float:
    """CPU time so far of this machine's PostgreSQL and Redis server processes (found by
    name), with their ended children's: a backend that exits is counted in its parent."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            name, fields = _stat(entry)
            if name.startswith(("postgres", "redis-server")):
                total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / _TICK


def machine_cpu_seconds() -> float:
    """Busy CPU time of all cores so far (``/proc/stat``: all but idle and iowait)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _TICK


def wrk(
    run: Run,
    base_url: str,
    script: str,
    *,
    seconds: float,
    connections: int,
    threads: int,
    pid: int | None = None,
) -> Load:
    """Drive ``base_url`` with ``script``; with ``pid``, also the CPU that server spent."""
    path = run.workdir / f"wrk-{secrets.token_hex(4)}.lua"
    path.write_text(script)
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", "-s", str(path), base_url,
    ]  # fmt: skip
    cpu_before = cpu_seconds(pid) if pid is not None else 0.0
    stores_before, machine_before = stores_cpu_seconds(), machine_cpu_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    cpu = cpu_seconds(pid) - cpu_before if pid is not None else None
    stores = stores_cpu_seconds() - stores_before
    machine = machine_cpu_seconds() - machine_before
    run.check_alive()
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    duration = raw["duration_us"] / 1e6
    return Load(
        requests=raw["requests"],
        seconds=round(duration, 2),
        rps=round(raw["requests"] / duration, 1),
        p50_ms=round(raw["p50_us"] / 1000, 2),
        p99_ms=round(raw["p99_us"] / 1000, 2),
        non_2xx=raw["non_2xx"],
        socket_errors=raw["socket_errors"],
        cpu_ms_per_request=(
            round(cpu * 1000 / raw["requests"], 3) if cpu is not None and raw["requests"] else None
        ),
        stores_cpu_ms_per_request=(
            round(stores * 1000 / raw["requests"], 3) if raw["requests"] else None
        ),
        machine_cpu_ms_per_request=(
            round(machine * 1000 / raw["requests"], 3) if raw["requests"] else None
        ),
    )


def paced(
    run: Run, url: str, key: str, body: dict[str, Any], rate: float, seconds: float
) -> dict[str, Any]:
    """POST ``body`` to ``url`` at ``rate`` requests/s for ``seconds``, evenly spaced and
    open-loop (``benchmarks/paced.py``; wrk has no fixed rate); its latency percentiles,
    each from the request's write to its response's end, as the client saw them."""
    seconds = max(seconds, min(30.0, 200 / max(rate, 1.0)))  # 200 answers for a p99
    argv = [
        sys.executable, "-m", "benchmarks.paced", url, "--rate", f"{rate:.1f}",
        "--seconds", f"{seconds:g}", "--method", "POST",
        "--header", "Content-Type: application/json",
        "--header", f"Authorization: Bearer {key}", "--body", json.dumps(body),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90)
    run.check_alive()
    if done.returncode != 0:
        raise RuntimeError(f"paced load failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    found: dict[str, Any] = json.loads(done.stdout)
    return found


@contextlib.contextmanager
def profiled(args: argparse.Namespace, proc: Proc | None, name: str) -> Iterator[None]:
    """With ``--profile DIR``: py-spy samples ``proc`` (and its children) meanwhile."""
    if args.profile is None or proc is None:
        yield
        return
    args.profile.mkdir(parents=True, exist_ok=True)
    out = args.profile / f"{name}.txt"
    spy_bin = (
        BIN / "py-spy" if (BIN / "py-spy").exists() else Path(shutil.which("py-spy") or "py-spy")
    )
    argv = [
        str(spy_bin), "record", "--format", "raw", "--rate", "250", "--subprocesses",
        "--nonblocking", "--pid", str(proc.popen.pid), "--output", str(out),
    ]  # fmt: skip
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


# --- the stack --------------------------------------------------------------------------


@dataclass
class Stack:
    run: Run
    database_url: str
    redis_url: str
    queue: str
    admin: dict[str, str]
    gateway: Proc | None = None
    gateway_url: str = ""


def stack_env(
    args: argparse.Namespace, database_url: str, workdir: Path, sim_url: str
) -> dict[str, str]:
    tag = secrets.token_hex(4)
    cert, _ = make_cert(workdir)
    (workdir / "storage").mkdir()
    upstream = {"base_url": sim_url, "api_key": SIM_KEY}
    huge_rate, huge_burst = "60000000", "1000000"
    settings = {
        "TOLLGATE_DATABASE_URL": database_url,
        "TOLLGATE_REDIS_URL": args.redis_url,
        "TOLLGATE_ADMIN_TOKEN": secrets.token_hex(16),
        "TOLLGATE_SIGNING_SECRET": secrets.token_hex(16),
        "TOLLGATE_ENCRYPTION_KEYS": "bench:" + secrets.token_urlsafe(32),
        "TOLLGATE_STORAGE_DIR": str(workdir / "storage"),
        "TOLLGATE_UPSTREAMS": json.dumps({"siliconflow": upstream, "krea": upstream}),
        "TOLLGATE_QUEUE_NAME": f"tollgate-bench-{tag}:queue",
        "TOLLGATE_CALLBACK_QUEUE_NAME": f"tollgate-bench-{tag}:callbacks",
        "TOLLGATE_CALLBACK_ALLOWED_HOSTS": json.dumps(["localhost"]),
        "TOLLGATE_CALLBACK_CA_BUNDLE": str(cert),
        "TOLLGATE_METRICS_PORT": "0",
        "TOLLGATE_LOG_LEVEL": "WARNING",
        # Limits stay on, so their cost is measured, but never refuse.
        "TOLLGATE_DEFAULT_KEY_RATE_LIMIT_PER_MINUTE": huge_rate,
        "TOLLGATE_DEFAULT_KEY_RATE_LIMIT_BURST": huge_burst,
        "TOLLGATE_DEFAULT_TENANT_RATE_LIMIT_PER_MINUTE": huge_rate,
        "TOLLGATE_DEFAULT_TENANT_RATE_LIMIT_BURST": huge_burst,
        "TOLLGATE_DEFAULT_MAX_IN_FLIGHT": "0",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    return {**env, **settings, "NO_PROXY": "*", "no_proxy": "*", "PYTHONUNBUFFERED": "1"}


def start_gateway(stack: Stack, workers: int, queue: str) -> None:
    port = free_port()
    env = {
        **stack.run.env,
        "TOLLGATE_QUEUE_NAME": queue,
        "TOLLGATE_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        # The submit paths leave thousands of open tasks behind; the worker's batch must not
        # be refused as an overload (that rule is the soak's to exercise, not a speed figure).
        "TOLLGATE_OVERLOAD_DEADLINE_FRACTION": "0",
    }
    stack.queue = queue
    stack.gateway = stack.run.start(
        "gateway",
        [str(BIN / "tollgate"), "serve", "--port", str(port), "--workers", str(workers)],
        env,
    )
    stack.gateway_url = f"http://127.0.0.1:{port}"
    wait_http(stack.run, f"{stack.gateway_url}/healthz")


def seed_tenants(stack: Stack, count: int) -> list[str]:
    """``count`` tenants with plenty of credits and one key each: their keys."""
    keys = []
    with httpx.Client(base_url=stack.gateway_url, headers=stack.admin, timeout=30) as client:
        for n in range(count):
            tenant = client.post("/admin/tenants", json={"name": f"bench-{n}"})
            tenant.raise_for_status()
            tenant_id = tenant.json()["id"]
            client.post(
                f"/admin/tenants/{tenant_id}/topup", json={"amount": "1000000"}
            ).raise_for_status()
            key = client.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "bench"})
            key.raise_for_status()
            keys.append(key.json()["key"])
    return keys


def submit_one(stack: Stack, key: str, callback_url: str | None = None) -> str:
    body = {**MODEL_BODY, **({"callback_url": callback_url} if callback_url else {})}
    response = httpx.post(
        f"{stack.gateway_url}/v1/images/generations",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    response.raise_for_status()
    task_id: str = response.json()["id"]
    return task_id


async def submit_many(stack: Stack, key: str, count: int, callback_url: str) -> list[str]:
    body = {**MODEL_BODY, "callback_url": callback_url}
    gate = asyncio.Semaphore(16)
    async with httpx.AsyncClient(
        base_url=stack.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:

        async def one() -> str:
            async with gate:
                response = await client.post("/v1/images/generations", json=body)
                response.raise_for_status()
                task_id: str = response.json()["id"]
                return task_id

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def _fetch(database_url: str, query: str, *params: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        return list(await conn.fetch(query, *params))
    finally:
        await conn.close()


def fetch(database_url: str, query: str, *params: Any) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(database_url, query, *params))


def wait_until(what: str, check: Any, run: Run, timeout: float, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        run.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout} s")
        time.sleep(every)


class TaskCounts:
    """How many of some tasks are completed, and how many failed or cancelled, over one
    connection kept for the phase: the benchmark's own watching must not be a load on the
    machine it measures (a new connection per look, ten looks a second, was a PostgreSQL
    backend started and stopped twenty times a second beside the worker)."""

    def __init__(self, database_url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn = self._loop.run_until_complete(asyncpg.connect(plain_url(database_url)))

    def __call__(self, task_ids: list[str]) -> tuple[int, int]:
        row = self._loop.run_until_complete(
            self._conn.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'completed'), "
                "count(*) FILTER (WHERE status IN ('failed', 'cancelled')) "
                "FROM tasks WHERE id = ANY($1)",
                task_ids,
            )
        )
        return int(row[0]), int(row[1])

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# --- the phases -------------------------------------------------------------------------


def paced_phase(args: argparse.Namespace, stack: Stack, keys: list[str]) -> dict[str, Any]:
    """``--paced-only``: one tenant's submits at ``--paced-rate`` (or at half the rate wrk
    reaches), evenly spaced: the gateway's latency under a steady load, alone."""
    assert stack.gateway is not None
    load = {"seconds": args.duration, "connections": args.connections, "threads": args.threads}
    submit = wrk_script("POST", "/v1/images/generations", keys[:1], MODEL_BODY)
    say("warming up the gateway")
    wrk(stack.run, stack.gateway_url, submit, **{**load, "seconds": max(1.0, args.duration / 5)})
    rate = args.paced_rate
    found: dict[str, Any] = {}
    if not rate:
        say("wrk: submit_1_tenant")
        with profiled(args, stack.gateway, "submit_1_tenant"):
            most = wrk(stack.run, stack.gateway_url, submit, **load, pid=stack.gateway.popen.pid)
        found["submit_1_tenant_rps"] = most.rps
        found["submit_1_tenant"] = most.__dict__
        rate = most.rps / 2
    say(f"paced: submit_1_tenant at {rate:.0f}/s")
    url = f"{stack.gateway_url}/v1/images/generations"
    found["submit_paced"] = paced(stack.run, url, keys[0], MODEL_BODY, rate, args.duration)
    return found


def http_phase(
    args: argparse.Namespace, stack: Stack, bare: Proc, bare_url: str, keys: list[str]
) -> dict[str, Any]:
    assert stack.gateway is not None
    load = {"seconds": args.duration, "connections": args.connections, "threads": args.threads}
    warm = {**load, "seconds": max(1.0, args.duration / 5)}
    submit = wrk_script("POST", "/v1/images/generations", keys[:1], MODEL_BODY)
    pending = submit_one(stack, keys[0])
    say("warming up the gateway")
    wrk(stack.run, stack.gateway_url, submit, **warm)
    wrk(stack.run, bare_url, wrk_script("GET", "/ping", [""]), **warm)
    rss_before = rss_kib(stack.gateway.popen.pid)
    served_before = 0
    paths: dict[str, Load] = {}
    plan = [
        ("bare", bare_url, wrk_script("GET", "/ping", [""])),
        ("healthz", stack.gateway_url, wrk_script("GET", "/healthz", [""])),
        ("models", stack.gateway_url, wrk_script("GET", "/v1/models", keys[:1])),
        ("submit_1_tenant", stack.gateway_url, submit),
        (
            "submit_50_tenants",
            stack.gateway_url,
            wrk_script("POST", "/v1/images/generations", keys, MODEL_BODY),
        ),
        (
            "task_read_pending",
            stack.gateway_url,
            wrk_script("GET", f"/v1/tasks/{pending}", keys[:1]),
        ),
    ]
    bare_next_to: dict[str, Load] = {}
    for name, url, script in plan:
        if name != "bare":
            # The machine's load moves from minute to minute: each path's ratio is to a
            # bare run made just before it.
            say(f"wrk: bare, before {name}")
            bare_next_to[name] = wrk(stack.run, bare_url, plan[0][2], **load, pid=bare.popen.pid)
        say(f"wrk: {name}")
        server = bare if name == "bare" else stack.gateway
        with profiled(args, stack.gateway if name != "bare" else None, name):
            paths[name] = wrk(stack.run, url, script, **load, pid=server.popen.pid)
        if name != "bare":
            served_before += paths[name].requests
    # Issue 12: the gateway's latency at half its maximum submit rate (1 tenant).
    half = paths["submit_1_tenant"].rps / 2
    say(f"paced: submit_1_tenant at half its maximum rate ({half:.0f}/s)")
    submit_at_half = paced(
        stack.run,
        f"{stack.gateway_url}/v1/images/generations",
        keys[0],
        MODEL_BODY,
        half,
        args.duration,
    )
    rss_after = rss_kib(stack.gateway.popen.pid)
    return {
        "paths": paths,
        "submit_at_half_rate": submit_at_half,
        "bare_next_to": bare_next_to,
        "pending_task": pending,
        "rss": {
            "before_kib": rss_before,
            "after_kib": rss_after,
            "requests_between": served_before,
        },
    }


_SOAK_SCRIPT = """
local keys = {KEYS}
local body = {BODY}
local ids = {{}}
local i, n = 0, 0
request = function()
  i = i + 1
  local key = keys[i % #keys + 1]
  local headers = {{["Authorization"] = "Bearer " .. key}}
  if #ids == 0 or i % {EVERY} == 0 then
    headers["Content-Type"] = "application/json"
    return wrk.format("POST", "/v1/images/generations", headers, body)
  end
  return wrk.format("GET", "/v1/tasks/" .. ids[math.random(#ids)], headers, nil)
end
response = function(status, headers, text)
  local id = text and text:match('"id":%s*"(task[^"]+)"')
  if status < 300 and id then
    n = n % 5000 + 1
    ids[n] = id
  end
end
"""


def soak_script(keys: list[str], submit_every: int) -> str:
    """Submits (one request in ``submit_every``) and reads of the tasks they made.

    The keys of one tenant only: a task is read with a key of the tenant that owns it.
    The last 5,000 task ids are kept, so reads cover many tasks (each id a new label or
    cache entry, if anything keeps one per task).
    """
    return (
        _SOAK_SCRIPT.format(
            KEYS="{" + ", ".join(_lua_string(k) for k in keys) + "}",
            BODY=_lua_string(json.dumps(MODEL_BODY)),
            EVERY=submit_every,
        )
        + _DONE
    )


def soak_phase(args: argparse.Namespace, stack: Stack, key: str) -> dict[str, Any]:
    """``--soak-requests N``: N submits and task reads, the gateway's RSS every chunk."""
    assert stack.gateway is not None
    pid = stack.gateway.popen.pid
    script = soak_script([key], args.soak_submit_every)
    load = {"connections": args.connections, "threads": args.threads}
    say(f"soak: {args.soak_requests:,} requests (1 submit in {args.soak_submit_every})")
    served, samples, chunks = 0, [(0, rss_kib(pid))], []
    while served < args.soak_requests:
        chunk = wrk(stack.run, stack.gateway_url, script, seconds=args.soak_chunk, **load)
        served += chunk.requests
        chunks.append(chunk)
        samples.append((served, rss_kib(pid)))
        say(f"soak: {served:,} requests, gateway RSS {samples[-1][1] / 1024:.1f} MiB")
    # The first chunk warms every cache up: the figure is from its end to the last.
    start = samples[1] if len(samples) > 2 else samples[0]
    return {
        "requests": served,
        "rps": round(served / sum(c.seconds for c in chunks), 1),
        "non_2xx": sum(c.non_2xx + c.socket_errors for c in chunks),
        "samples_mib": [(n, round(kib / 1024, 1)) for n, kib in samples],
        "rss": {
            "before_kib": start[1],
            "after_kib": samples[-1][1],
            "requests_between": served - start[0],
        },
    }


def end_http_tasks(database_url: str) -> None:
    """Fail the tasks the HTTP paths left open, as the deadline sweeper does (through
    the ledger, their holds released). Their queue has no worker, but the worker's
    reconciler queues every task pending 20 s again on its own queue: left open, tens of
    thousands of them would run beside the worker's batch and count in its figure
    (before the sixth round they did: 191.3 tasks/s at 4.38 ms of CPU per task, against
    229.3 and 3.79 with them ended, in two runs on the same machine)."""
    ended = asyncio.run(_end_open_tasks(database_url))
    say(f"ended the {ended:,} tasks the HTTP paths left open")


async def _end_open_tasks(database_url: str) -> int:
    """Fail every open task, 2,000 a transaction. Not all at once: ending settles each
    on its tenant's row, and one transaction updating a row 250,000 times (a soak's
    tasks, one tenant's) slows down with every version it leaves of it (over 15 minutes,
    where batches take seconds)."""
    ended = 0
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        while True:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM tollgate_fail_overdue(0, 2000, 'benchmark',"
                " 'submitted by the benchmark''s HTTP paths, never run')"
            )
            ended += count
            if count == 0:
                return ended
    finally:
        await conn.close()


def job_runs(metrics_port: int) -> int:
    """The worker's generation job runs so far (``tollgate_generation_runs_total``)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return round(
        sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("tollgate_generation_runs_total{")
        )
    )


def worker_phase(
    args: argparse.Namespace, stack: Stack, key: str, receiver: Receiver
) -> dict[str, Any]:
    run, db = stack.run, stack.database_url
    callback = receiver.url()
    say(f"submitting {args.tasks} tasks with no worker running")
    batch = asyncio.run(submit_many(stack, key, args.tasks, callback))
    ids = list(batch)

    counts = TaskCounts(db)  # (completed, failed or cancelled) of some tasks

    say("starting one worker")
    metrics_port = free_port()
    worker = run.start(
        "worker",
        [str(BIN / "tollgate-worker")],
        env={**run.env, "TOLLGATE_METRICS_PORT": str(metrics_port)},
    )
    early = max(1, args.tasks // 10)
    # Each look sends the batch's ids to PostgreSQL: a larger batch is looked at less often,
    # so that the watching stays a small load (ten looks a second at 100,000 ids each kept
    # a core of the machine busy, and the worker missed the warm-up's deadline). The
    # warm-up may take longer behind a larger backlog (each first job parks once).
    look_every = max(0.25, len(batch) / 20_000)
    warm_within = 120 + len(batch) / 100
    wait_until("worker warm", lambda: counts(batch)[0] >= early, run, warm_within, look_every)
    rss_before = rss_kib(worker.popen.pid)
    cpu_before, runs_before = cpu_seconds(worker.popen.pid), job_runs(metrics_port)
    done_before = counts(batch)[0]
    samples: list[tuple[int, float]] = [(done_before, round(rss_before / 1024, 1))]
    last_sample = time.monotonic()

    def batch_done() -> bool:
        nonlocal last_sample
        done, ended_otherwise = counts(batch)
        if time.monotonic() - last_sample >= 5:  # the worker's RSS as the tasks go by
            samples.append((done, round(rss_kib(worker.popen.pid) / 1024, 1)))
            last_sample = time.monotonic()
        return done + ended_otherwise >= len(batch)

    with profiled(args, worker, "worker_batch"):
        wait_until("worker batch", batch_done, run, args.tasks + 120, every=look_every)
    cpu_after, runs_after = cpu_seconds(worker.popen.pid), job_runs(metrics_port)
    rss_after = rss_kib(worker.popen.pid)
    finished, failed_in_batch = counts(batch)  # the batch is over: these stay
    between = finished - done_before
    samples.append((finished, round(rss_after / 1024, 1)))
    span = fetch(
        db,
        "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM tasks "
        "WHERE id = ANY($1) AND status = 'completed'",
        batch,
    )[0][0]
    tasks_per_s = finished / float(span) if span else 0.0

    say(f"submitting {args.latency_samples} tasks at {args.latency_rate}/s to an idle worker")
    paced: list[str] = []
    interval = 1 / args.latency_rate
    for _ in range(args.latency_samples):
        started = time.monotonic()
        paced.append(submit_one(stack, key, callback))
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    ids += paced
    wait_until("paced tasks", lambda: sum(counts(paced)) >= len(paced), run, 60)
    rows = fetch(
        db,
        "SELECT extract(epoch FROM started_at - created_at) FROM tasks "
        "WHERE id = ANY($1) AND started_at IS NOT NULL",
        paced,
    )
    waits = [float(r[0]) * 1000 for r in rows]
    finished_task = batch[0]
    counts.close()
    run.stop(worker)
    return {
        "tasks": len(batch),
        "completed": finished,
        "failed": failed_in_batch,
        "simulator_latency_s": args.latency,
        "tasks_per_s": round(tasks_per_s, 1),
        # Over the batch past its first tenth: the worker process's user + system CPU, and
        # its generation job runs (a parked run ends and runs again once handed a slot).
        "cpu_ms_per_task": round((cpu_after - cpu_before) * 1000 / between, 2) if between else None,
        "job_runs_per_task": round((runs_after - runs_before) / between, 2) if between else None,
        "start_latency_samples": len(waits),
        "start_latency_p50_ms": round(percentile(waits, 50), 1) if waits else None,
        "start_latency_p99_ms": round(percentile(waits, 99), 1) if waits else None,
        "rss": {
            "before_kib": rss_before,
            "after_kib": rss_after,
            "tasks_between": finished - done_before,
        },
        "rss_samples_mib": samples,  # (tasks completed, MiB), every 5 s
        "completed_task": finished_task,
        "all_tasks": ids,
    }


def callback_phase(
    args: argparse.Namespace, stack: Stack, receiver: Receiver, expected: int
) -> dict[str, Any]:
    run = stack.run
    say(f"starting one callback worker for {expected} deliveries")
    worker = run.start("callbacks", [str(BIN / "tollgate-worker"), "--callbacks"])
    early = max(1, expected // 10)
    wait_until("callback worker warm", lambda: len(receiver.arrivals) >= early, run, 120)
    rss_before = rss_kib(worker.popen.pid)
    delivered_before = len(receiver.arrivals)
    cpu_before = cpu_seconds(worker.popen.pid)
    with profiled(args, worker, "callbacks"):
        wait_until("deliveries", lambda: len(receiver.arrivals) >= expected, run, expected + 120)
    cpu_total = cpu_seconds(worker.popen.pid)
    cpu, delivered = cpu_total - cpu_before, len(receiver.arrivals) - delivered_before
    if delivered == 0:  # all delivered while it warmed up (a smoke run): the whole run's
        cpu, delivered = cpu_total, len(receiver.arrivals)
    rss_after = rss_kib(worker.popen.pid)
    run.stop(worker)
    arrivals = receiver.arrivals[:expected]
    span = arrivals[-1] - arrivals[0]
    return {
        "deliveries": len(arrivals),
        "deliveries_per_s": round((len(arrivals) - 1) / span, 1) if span > 0 else None,
        # The callback worker's CPU per delivery: 1000 / this is what one process would
        # deliver per second with a core to itself, which a shared machine never gives.
        "cpu_ms_per_delivery": round(cpu * 1000 / delivered, 3) if delivered else None,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "rss": {
            "before_kib": rss_before,
            "after_kib": rss_after,
            "deliveries_between": len(arrivals) - delivered_before,
        },
    }


# --- the report -------------------------------------------------------------------------


def figures(
    http: dict[str, Any],
    completed_read: Load,
    worker: dict[str, Any],
    callbacks: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    paths: dict[str, Load] = {**http["paths"], "task_read_completed": completed_read}
    bare: dict[str, Load] = {"bare": paths["bare"], **http["bare_next_to"]}
    return {
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
        "settings": {
            "duration_s": args.duration,
            "connections": args.connections,
            "threads": args.threads,
            "gateway_workers": args.gateway_workers,
            "smoke": args.smoke,
        },
        "http": {
            name: {
                **load.__dict__,
                "bare_rps": bare[name].rps,
                "ratio_to_bare": round(load.rps / bare[name].rps, 3) if bare[name].rps else None,
                "bare_cpu_ms_per_request": bare[name].cpu_ms_per_request,
                # CPU per request of the bare server over this path's: the ratio the
                # throughputs would have if each server had a CPU of its own.
                "cpu_ratio_to_bare": _cpu_ratio(bare[name], load),
            }
            for name, load in paths.items()
        },
        "submit_at_half_rate": http["submit_at_half_rate"],
        "worker": {k: v for k, v in worker.items() if k not in ("all_tasks", "completed_task")},
        "callbacks": callbacks,
        "rss_mib": {
            "gateway": _mib(http["rss"], "requests_between"),
            "worker": _mib(worker["rss"], "tasks_between"),
            "callback_worker": _mib(callbacks["rss"], "deliveries_between"),
        },
    }


def _cpu_ratio(bare: Load, path: Load) -> float | None:
    if not bare.cpu_ms_per_request or not path.cpu_ms_per_request:
        return None
    return round(bare.cpu_ms_per_request / path.cpu_ms_per_request, 3)


def _mib(rss: dict[str, int], between: str) -> dict[str, Any]:
    before, after = rss["before_kib"] / 1024, rss["after_kib"] / 1024
    return {
        "before": round(before, 1),
        "after": round(after, 1),
        "change_pct": round((after - before) / before * 100, 1) if before else None,
        between: rss[between],
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        "| path | req/s | p50 ms | p99 ms | bare req/s just before | ratio to bare "
        "| server CPU ms/request | CPU ratio to bare | PostgreSQL + Redis CPU ms/request "
        "| machine CPU ms/request | non-2xx |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, load in result["http"].items():
        rows.append(
            f"| {name} | {load['rps']:,.0f} | {load['p50_ms']} | {load['p99_ms']} | "
            f"{load['bare_rps']:,.0f} | {load['ratio_to_bare']:.3f} | "
            f"{load['cpu_ms_per_request']} | {load['cpu_ratio_to_bare']} | "
            f"{load['stores_cpu_ms_per_request']} | {load['machine_cpu_ms_per_request']} | "
            f"{load['non_2xx'] + load['socket_errors']} |"
        )
    worker, callbacks, rss = result["worker"], result["callbacks"], result["rss_mib"]
    half = result["submit_at_half_rate"]
    rows += [
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| submit, 1 tenant, at half its maximum rate ({half['rate']:,.0f}/s, paced): "
        f"p50 / p99 ms | {half['p50_ms']} / {half['p99_ms']} ({half['non_2xx']} non-2xx) |",
        f"| worker tasks/s (simulator latency {worker['simulator_latency_s']} s, "
        f"{worker['tasks']} tasks) | {worker['tasks_per_s']} |",
        f"| worker CPU ms per task | {worker['cpu_ms_per_task']} |",
        f"| generation job runs per task | {worker['job_runs_per_task']} |",
        f"| submit → job start p50 / p99 ms ({worker['start_latency_samples']} tasks) | "
        f"{worker['start_latency_p50_ms']} / {worker['start_latency_p99_ms']} |",
        f"| callback deliveries/s ({callbacks['deliveries']} deliveries) | "
        f"{callbacks['deliveries_per_s']} |",
        f"| callback worker CPU ms per delivery | {callbacks['cpu_ms_per_delivery']} |",
    ]
    for name, figure in rss.items():
        between = next(k for k in figure if k.endswith("_between"))
        rows.append(
            f"| {name} RSS MiB before → after ({figure[between]:,} {between.split('_')[0]}) | "
            f"{figure['before']} → {figure['after']} ({figure['change_pct']:+} %) |"
        )
    if "waiters" in result:
        rows += waiters_rows(result["waiters"])
    return "\n".join(rows)


def waiters_rows(found: dict[str, Any]) -> list[str]:
    n = f"{found['waiters']:,} waiting"
    return [
        f"| gateway RSS MiB before → while {n} (KiB per waiter) | {found['rss_before_mib']} → "
        f"{found['rss_waiting_mib']} ({found['kib_per_waiter']}) |",
        f"| PostgreSQL connections in use while {n} | "
        f"{found['db_connections_busy_while_waiting']} |",
        f"| {n}: answered after their task's commit p50 / p99 / max ms | "
        f"{found['latency_p50_ms']} / {found['latency_p99_ms']} / {found['latency_max_ms']} |",
        f"| {n}: answered after the signal reached subscribers p50 / p99 / max ms | "
        f"{found['after_signal_p50_ms']} / {found['after_signal_p99_ms']} / "
        f"{found['after_signal_max_ms']} |",
        f"| {n}: answered within 100 ms of their task's commit | "
        f"{found['answered_within_100ms_pct']} % |",
    ]


def waiters_phase(args: argparse.Namespace) -> dict[str, Any]:
    """``benchmarks.waiters`` in its own process, with its own database and gateway."""
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-waiters-") as tmp:
        figures_path = Path(tmp) / "waiters.json"
        argv = [
            sys.executable, "-m", "benchmarks.waiters", "--database-url", args.database_url,
            "--redis-url", args.redis_url, "--json", str(figures_path),
        ]  # fmt: skip
        argv += ["--smoke"] if args.smoke else ["--waiters", str(args.waiters)]
        say(f"waiters: {'smoke' if args.smoke else args.waiters} long-polls on one gateway")
        subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        found: dict[str, Any] = json.loads(figures_path.read_text())
        return found


# --- cleanup ----------------------------------------------------------------------------


def clean_redis(redis_url: str, queues: list[str], task_ids: list[str]) -> None:
    """Delete what this run put in Redis, by name: never a flush of a shared server."""
    client = Redis.from_url(redis_url)
    try:
        names: set[bytes | str] = set()
        for queue in queues:
            jobs: list[bytes] = client.zrange(queue, 0, -1)  # type: ignore[assignment]
            names.update(b"arq:job:" + job for job in jobs)
            names.add(queue)
            prefix = queue.rsplit(":", 1)[0]
            names.update(client.scan_iter(match=f"*{prefix}*", count=1000))
        for task_id in task_ids:
            for part in ("job", "in-progress", "retry", "result"):
                names.add(f"arq:{part}:gen:{task_id}:1")
        items = list(names)
        for start in range(0, len(items), 1000):
            client.delete(*items[start : start + 1000])
    finally:
        client.close()


# --- main -------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--database-url", required=True, help="any database on the server; the run makes its own"
    )
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--duration", type=float, default=10, help="seconds per HTTP path")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gateway-workers", type=int, default=1, help="tollgate serve --workers")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks for the worker figure")
    parser.add_argument(
        "--latency",
        type=float,
        default=0,
        help="the simulator's job time, seconds (0: the worker's own throughput; above, a "
        "backlog behind the upstream's 16 slots, parking included)",
    )
    parser.add_argument("--latency-samples", type=int, default=100)
    parser.add_argument("--latency-rate", type=float, default=20, help="paced submits per second")
    parser.add_argument(
        "--waiters", type=int, default=10_000, help="long-polls waiting at once (0: no such step)"
    )
    parser.add_argument(
        "--soak-requests",
        type=int,
        default=0,
        help="a long run: this many submits and task reads on one tenant, the gateway's RSS "
        "sampled every --soak-chunk seconds (0: none)",
    )
    parser.add_argument("--soak-chunk", type=float, default=30, help="seconds per soak sample")
    parser.add_argument("--soak-submit-every", type=int, default=4, help="1 submit in N")
    parser.add_argument("--smoke", action="store_true", help="about a second per step")
    parser.add_argument(
        "--worker-only",
        action="store_true",
        help="only the worker figures (tasks/s, enqueue to start), no HTTP paths or callbacks",
    )
    parser.add_argument(
        "--callbacks-only",
        action="store_true",
        help="only the worker's batch (to make the deliveries) and the callback figures",
    )
    parser.add_argument(
        "--paced-only",
        action="store_true",
        help="only one tenant's submits at a steady rate (half wrk's, or --paced-rate)",
    )
    parser.add_argument("--paced-rate", type=float, default=0, help="with --paced-only, per s")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="record each gateway path with py-spy (pip install py-spy) into this folder; "
        "summarise one with python -m benchmarks.profile FILE",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.tasks, args.latency_samples = 1, 20, 5
        args.soak_requests, args.soak_chunk = 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if shutil.which("wrk") is None:
        say("wrk is required: `apt-get install wrk` (python3 scripts/dev.py bench installs it)")
        return 2
    server = plain_url(args.database_url)
    name = f"tollgate_bench_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_admin(server, f'CREATE DATABASE "{name}"'))
    database_url = make_url(args.database_url).set(drivername="postgresql+asyncpg", database=name)
    db = database_url.render_as_string(hide_password=False)
    queues: list[str] = []
    task_ids: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-") as tmp:
        workdir = Path(tmp)
        sim_port = free_port()
        env = stack_env(args, db, workdir, f"http://127.0.0.1:{sim_port}")
        run = Run(workdir, env)
        receiver = Receiver(Path(env["TOLLGATE_CALLBACK_CA_BUNDLE"]), workdir / "receiver-key.pem")
        try:
            subprocess.run(
                [str(BIN / "tollgate"), "migrate"],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            run.start("simulator", [
                sys.executable, "-m", "workers.simulator", "--port", str(sim_port),
                "--api-key", SIM_KEY, "--latency", str(args.latency),
            ])  # fmt: skip
            bare_port = free_port()
            bare = run.start("bare", [
                sys.executable, "-m", "benchmarks.bare", "--port", str(bare_port),
                "--workers", str(args.gateway_workers),
            ])  # fmt: skip
            bare_url = f"http://127.0.0.1:{bare_port}"
            wait_http(run, f"{bare_url}/ping")
            wait_http(run, f"http://127.0.0.1:{sim_port}/_sim/stats")
            receiver.start()
            stack = Stack(
                run,
                db,
                args.redis_url,
                "",
                {"Authorization": f"Bearer {env['TOLLGATE_ADMIN_TOKEN']}"},
            )
            queues += [
                env["TOLLGATE_QUEUE_NAME"] + "-http",
                env["TOLLGATE_QUEUE_NAME"],
                env["TOLLGATE_CALLBACK_QUEUE_NAME"],
            ]
            # The HTTP paths queue tens of thousands of tasks nobody will run: on a queue
            # of their own, so the worker's figure starts from an empty queue.
            start_gateway(stack, args.gateway_workers, queues[0])
            keys = seed_tenants(stack, TENANTS)
            if args.worker_only:
                assert stack.gateway is not None
                run.stop(stack.gateway)
                start_gateway(stack, args.gateway_workers, queues[1])
                worker = worker_phase(args, stack, keys[1], receiver)
                task_ids += worker.pop("all_tasks")
                print(json.dumps(worker, indent=2))
                return 0
            if args.paced_only:
                print(json.dumps(paced_phase(args, stack, keys), indent=2))
                return 0
            if args.callbacks_only:
                assert stack.gateway is not None
                run.stop(stack.gateway)
                start_gateway(stack, args.gateway_workers, queues[1])
                worker = worker_phase(args, stack, keys[1], receiver)
                task_ids += worker["all_tasks"]
                callbacks = callback_phase(args, stack, receiver, len(worker["all_tasks"]))
                print(json.dumps(callbacks, indent=2))
                return 0
            http = http_phase(args, stack, bare, bare_url, keys)
            soak = soak_phase(args, stack, keys[0]) if args.soak_requests else None
            assert stack.gateway is not None
            run.stop(stack.gateway)
            end_http_tasks(db)
            start_gateway(stack, args.gateway_workers, queues[1])
            worker = worker_phase(args, stack, keys[1], receiver)
            task_ids += worker["all_tasks"]
            load = {
                "seconds": args.duration,
                "connections": args.connections,
                "threads": args.threads,
            }
            say("wrk: bare, before task_read_completed")
            ping = wrk_script("GET", "/ping", [""])
            http["bare_next_to"]["task_read_completed"] = wrk(
                run, bare_url, ping, **load, pid=bare.popen.pid
            )
            say("wrk: task_read_completed")
            assert stack.gateway is not None
            completed_read = wrk(
                run,
                stack.gateway_url,
                wrk_script("GET", f"/v1/tasks/{worker['completed_task']}", keys[1:2]),
                **load,
                pid=stack.gateway.popen.pid,
            )
            callbacks = callback_phase(args, stack, receiver, len(worker["all_tasks"]))
            result = figures(http, completed_read, worker, callbacks, args)
            if soak is not None:
                result["soak"] = soak
                result["rss_mib"]["gateway_soak"] = _mib(soak["rss"], "requests_between")
        finally:
            run.stop_all()
            receiver.stop()
            with contextlib.suppress(Exception):
                clean_redis(args.redis_url, queues, task_ids)
            asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    if args.waiters:
        result["waiters"] = waiters_phase(args)
    print(table(result))
    print()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


async def _admin(server: str, sql: str) -> None:
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
