"""The waiters figure: many requests waiting on one gateway process for their tasks' ends.

``python -m benchmarks.waiters --database-url … --redis-url … [--waiters 10000]`` :

1. A fresh database (created, migrated, dropped at the end) and a queue name of its own
   in Redis (its keys are deleted at the end; Redis is never flushed).
2. One gateway process, ``tollgate serve`` (limits off: one key makes every request).
3. ``--tasks`` tasks submitted through ``POST /v1/images/generations``; no worker runs,
   so they stay pending.
4. ``--waiters`` long-polls, ``GET /v1/tasks/{id}`` with ``Prefer: wait=60``, spread evenly
   over the tasks, each on its own connection, all open at once. Raw HTTP/1.1 over
   asyncio streams, so the client costs little next to what it measures. A request
   answered "not yet" (its 60 s ran out while the others were still being opened, on a
   slow machine) asks again on the same connection, as a client's loop would.
5. While they all wait: the gateway's RSS (against its RSS before they came) and its
   PostgreSQL connections, all and busy (``pg_stat_activity``: active or in a
   transaction), sampled every 100 ms.
6. The tasks end at a steady ``--end-rate`` per second, each in one transaction through
   ``gateway/tasks/lifecycle.py`` on an engine that signals like a worker's
   (``events.attach``). For each request: answer received − its task's commit; and
   answer received − its task's signal as a subscriber of the channel (this process)
   received it, which leaves out Redis's part: the gateway's read, render and send,
   and this client's read.

It prints the figures as a table, then as JSON (``--json PATH`` writes them too).
``--smoke`` waits a few hundred requests: it proves the benchmark works and measures
nothing worth keeping. Absolute figures depend on the machine and what else runs on it.
"""

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "flux-1-schnell", "prompt": "a lighthouse at dawn", "size": "512x512"}
APP_NAME = "tollgate-bench-waiters"  # this process's own database connections
WAIT = 60
OPEN_BATCH = 250  # connections opened at once, well inside the listen backlog


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plain_url(url: str) -> str:
    rendered = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return str(rendered)


def asyncpg_url(url: str) -> str:
    rendered = make_url(url).set(drivername="postgresql+asyncpg")
    return str(rendered.render_as_string(hide_password=False))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def quiet(pid: int, *, limit: float = 600) -> None:
    """Until the gateway has used under 5 % of a core for a second: every request read."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(1)
        if cpu_seconds(pid) - before < 0.05:
            return


def raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        raise SystemExit(f"bench: needs {needed} open files, the limit is {soft} (ulimit -n)")


# --- the database -------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    name = f"tollgate_waiters_{os.getpid()}_{secrets.token_hex(3)}"
    server = plain_url(server_url)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(drivername="postgresql+asyncpg", database=name)
    rendered = url.render_as_string(hide_password=False)
    try:
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env={**os.environ, "TOLLGATE_DATABASE_URL": rendered},
            check=True,
            capture_output=True,
        )
        yield rendered
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def seed_key(database_url: str, encryption_keys: str) -> str:
    from gateway import crypto
    from gateway.db import session_factory, transaction
    from gateway.ledger import service as ledger
    from gateway.ledger.models import EntryKind
    from gateway.tenants.service import create_tenant, issue_key

    engine = create_async_engine(database_url)
    # The tenant's webhook secret is sealed with the gateway's keys (gateway/crypto.py).
    crypto.attach(engine.sync_engine.dialect, crypto.Keyring.parse(encryption_keys))
    try:
        async with transaction(session_factory(engine)) as session:
            tenant = await create_tenant(session, name="bench-waiters")
            await ledger.credit(
                session,
                tenant.id,
                10**15,
                kind=EntryKind.TOPUP,
                idempotency_key=f"bench-topup:{tenant.id}",
            )
            issued = await issue_key(session, tenant, name="bench")
            return issued.secret
    finally:
        await engine.dispose()


# --- the gateway --------------------------------------------------------------------


def gateway_env(database_url: str, redis_url: str, queue: str, storage: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(
        TOLLGATE_DATABASE_URL=database_url,
        TOLLGATE_REDIS_URL=redis_url,
        TOLLGATE_ADMIN_TOKEN=secrets.token_hex(16),
        TOLLGATE_SIGNING_SECRET=secrets.token_hex(16),
        TOLLGATE_ENCRYPTION_KEYS="bench:" + secrets.token_urlsafe(32),
        TOLLGATE_QUEUE_NAME=queue,
        TOLLGATE_STORAGE_DIR=str(storage),
        TOLLGATE_DEFAULT_KEY_RATE_LIMIT_PER_MINUTE="0",
        TOLLGATE_DEFAULT_TENANT_RATE_LIMIT_PER_MINUTE="0",
        TOLLGATE_DEFAULT_MAX_IN_FLIGHT="0",
        TOLLGATE_KEY_CACHE_TTL_SECONDS="60",
        TOLLGATE_LOG_LEVEL="WARNING",
    )
    return env


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: the gateway exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not answer within {timeout}s")


# --- the waiting requests -----------------------------------------------------------


class Waiter:
    __slots__ = ("answered", "repolls", "status", "task_id", "writer")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.repolls = 0
        self.answered = 0.0
        self.status = ""
        self.writer: asyncio.StreamWriter | None = None


def long_poll(task_id: str, key: str) -> bytes:
    return (
        f"GET /v1/tasks/{task_id} HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {key}\r\nPrefer: wait={WAIT}\r\n\r\n"
    ).encode()


async def open_waiter(port: int, key: str, waiter: Waiter) -> asyncio.StreamReader:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    waiter.writer = writer
    writer.write(long_poll(waiter.task_id, key))
    await writer.drain()
    return reader


async def read_answer(reader: asyncio.StreamReader, waiter: Waiter, key: str) -> None:
    """Read answers until the task is final, asking again (as a client loops on a
    long-poll) when a wait ran out first; the time of the final answer counts."""
    assert waiter.writer is not None
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length)
        status = json.loads(body).get("status", "?")
        if status in ("completed", "failed", "cancelled"):
            break
        waiter.repolls += 1
        waiter.writer.write(long_poll(waiter.task_id, key))
        await waiter.writer.drain()
    waiter.answered = time.time()
    waiter.status = status
    waiter.writer.close()


async def connections(conn: asyncpg.Connection, database: str) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT count(*) AS all, count(*) FILTER (WHERE state <> 'idle') AS busy "
        "FROM pg_stat_activity WHERE datname = $1 AND application_name <> $2 "
        "AND pid <> pg_backend_pid()",
        database,
        APP_NAME,
    )
    assert row is not None
    return int(row["all"]), int(row["busy"])


async def record_signals(
    redis_url: str, channel: str, into: dict[str, float], subscribed: asyncio.Event
) -> None:
    """The time each task's first signal reached a subscriber (as the gateway's does)."""
    client = AsyncRedis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(channel)
        subscribed.set()
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "message":
                into.setdefault(message["data"].decode(), time.time())
    finally:
        await pubsub.aclose()
        await client.aclose()


async def end_tasks(engine: AsyncEngine, task_ids: list[str], rate: float) -> dict[str, float]:
    """End every task in its own transaction, ``rate`` per second: its commit times."""
    from gateway.tasks import lifecycle

    committed: dict[str, float] = {}
    started = time.monotonic()
    for number, task_id in enumerate(task_ids):
        pause = started + number / rate - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        async with engine.begin() as conn:
            assert await lifecycle.claim(conn, task_id, 0, 60) is not None
            assert await lifecycle.complete(conn, task_id, 0, [f"{task_id}/0.png"], 3600)
        committed[task_id] = time.time()
    return committed


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


async def measure(
    args: argparse.Namespace, database_url: str, queue: str, key: str, port: int, pid: int
) -> dict[str, Any]:
    from gateway.redis_keys import task_events_channel
    from gateway.tasks import events

    engine = create_async_engine(
        asyncpg_url(database_url),
        connect_args={"server_settings": {"application_name": APP_NAME}},
    )
    publisher = events.Publisher(AsyncRedis.from_url(args.redis_url), task_events_channel(queue))
    publisher.start()
    events.attach(engine, publisher)
    stats = await asyncpg.connect(
        plain_url(database_url), server_settings={"application_name": APP_NAME}
    )
    database = make_url(database_url).database or ""
    task_ids: list[str] = []
    try:
        say(f"submitting {args.tasks} tasks")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key}"},
            limits=httpx.Limits(max_connections=32),
            trust_env=False,
            timeout=30,
        ) as http:
            semaphore = asyncio.Semaphore(32)

            async def submit() -> str:
                async with semaphore:
                    response = await http.post("/v1/images/generations", json=BODY)
                    response.raise_for_status()
                    task_id: str = response.json()["id"]
                    return task_id

            task_ids = list(await asyncio.gather(*(submit() for _ in range(args.tasks))))
            # Warm the read path, then take the baseline.
            for task_id in task_ids[:50]:
                (await http.get(f"/v1/tasks/{task_id}")).raise_for_status()
        await asyncio.sleep(1)
        rss_before = rss_kib(pid)

        say(f"opening {args.waiters} waiting requests")
        opening = time.monotonic()
        waiters = [Waiter(task_ids[i % len(task_ids)]) for i in range(args.waiters)]
        readers: list[asyncio.Task[None]] = []
        for start in range(0, len(waiters), OPEN_BATCH):
            batch = waiters[start : start + OPEN_BATCH]
            opened = await asyncio.gather(*(open_waiter(port, key, w) for w in batch))
            readers += [
                asyncio.create_task(read_answer(reader, w, key))
                for reader, w in zip(opened, batch, strict=True)
            ]
        # Every request has read its task once when the gateway falls quiet; from then
        # on they only wait.
        await quiet(pid)
        opened_seconds = time.monotonic() - opening
        say(f"all {args.waiters} sent and read once in {opened_seconds:.1f}s")
        await asyncio.sleep(2)
        early = sum(1 for w in waiters if w.answered)
        repolled_while_opening = sum(1 for w in waiters if w.repolls)
        rss_waiting = rss_kib(pid)
        samples = []
        for _ in range(10):
            samples.append(await connections(stats, database))
            await asyncio.sleep(0.1)

        say(f"ending the tasks, {args.end_rate}/s")
        sampling = True

        async def sample_while_ending() -> None:
            while sampling:
                samples_during.append(await connections(stats, database))
                await asyncio.sleep(0.1)

        samples_during: list[tuple[int, int]] = []
        sampler = asyncio.create_task(sample_while_ending())
        signalled: dict[str, float] = {}
        subscribed = asyncio.Event()
        listener = asyncio.create_task(
            record_signals(args.redis_url, task_events_channel(queue), signalled, subscribed)
        )
        async with asyncio.timeout(30):
            await subscribed.wait()
        committed = await end_tasks(engine, task_ids, args.end_rate)
        say("all tasks ended; waiting for the last answers")
        done, pending = await asyncio.wait(readers, timeout=WAIT)
        for reader in pending:
            reader.cancel()
        failed = sum(1 for reader in done if reader.exception() is not None)
        sampling = False
        await sampler
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        answered = [w for w in waiters if w.answered]
        rss_peak = rss_kib(pid)
        latencies = [w.answered - committed[w.task_id] for w in answered] or [float("inf")]
        statuses = {w.status for w in answered}
        within = sum(1 for latency in latencies if latency <= 0.1)
        after_signal = [
            w.answered - signalled[w.task_id] for w in answered if w.task_id in signalled
        ] or [float("inf")]
        return {
            "waiters": args.waiters,
            "tasks": args.tasks,
            "end_rate_per_s": args.end_rate,
            "answered_before_their_task_ended": early,
            "unanswered": len(pending),
            "asked_again_after_a_60s_wait": repolled_while_opening,
            "connection_errors": failed,
            "seconds_to_open_all": round(opened_seconds, 1),
            "statuses": sorted(statuses),
            "rss_before_mib": round(rss_before / 1024, 1),
            "rss_waiting_mib": round(rss_waiting / 1024, 1),
            "rss_after_mib": round(rss_peak / 1024, 1),
            "kib_per_waiter": round((rss_waiting - rss_before) / args.waiters, 2),
            "db_connections_while_waiting": max(all_ for all_, _ in samples),
            "db_connections_busy_while_waiting": max(busy for _, busy in samples),
            "db_connections_busy_while_ending": max((b for _, b in samples_during), default=0),
            "latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "latency_p99_ms": round(percentile(latencies, 99) * 1000, 1),
            "latency_max_ms": round(max(latencies) * 1000, 1),
            "after_signal_p50_ms": round(percentile(after_signal, 50) * 1000, 1),
            "after_signal_p99_ms": round(percentile(after_signal, 99) * 1000, 1),
            "after_signal_max_ms": round(max(after_signal) * 1000, 1),
            "answered_within_100ms": within,
            "answered_within_100ms_pct": round(100 * within / args.waiters, 2),
        }
    finally:
        await stats.close()
        await publisher.close()
        events.detach(engine)
        await engine.dispose()
        await publisher.redis.aclose()
        clean_redis(args.redis_url, queue, task_ids)


def clean_redis(redis_url: str, queue: str, task_ids: list[str]) -> None:
    redis = Redis.from_url(redis_url)
    keys = [queue] + [f"arq:job:gen:{task_id}:0" for task_id in task_ids]
    for start in range(0, len(keys), 500):
        redis.delete(*keys[start : start + 500])
    redis.close()


def table(result: dict[str, Any]) -> str:
    rows = [
        ("requests waiting at once", f"{result['waiters']} on {result['tasks']} tasks"),
        (
            "gateway RSS before → waiting",
            f"{result['rss_before_mib']} → "
            f"{result['rss_waiting_mib']} MiB ({result['kib_per_waiter']} KiB per waiter)",
        ),
        (
            "PostgreSQL connections while waiting",
            f"{result['db_connections_while_waiting']} open, "
            f"{result['db_connections_busy_while_waiting']} in use",
        ),
        (
            "answered after their task's commit",
            f"p50 {result['latency_p50_ms']} ms, p99 {result['latency_p99_ms']} ms, "
            f"max {result['latency_max_ms']} ms",
        ),
        (
            "answered after the signal reached Redis subscribers",
            f"p50 {result['after_signal_p50_ms']} ms, p99 {result['after_signal_p99_ms']} ms, "
            f"max {result['after_signal_max_ms']} ms",
        ),
        (
            "answered within 100 ms",
            f"{result['answered_within_100ms']} ({result['answered_within_100ms_pct']} %)",
        ),
        ("tasks ended per second", str(result["end_rate_per_s"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.waiters", description=__doc__)
    parser.add_argument("--database-url", required=True, help="any database on the server")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=1_000)
    parser.add_argument("--end-rate", type=float, default=100.0, help="tasks ended per second")
    parser.add_argument("--smoke", action="store_true", help="a few hundred waiters")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.waiters, args.tasks, args.end_rate = 200, 20, 50.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    raise_file_limit(args.waiters + 1024)
    queue = f"tollgate:bench-waiters:{secrets.token_hex(4)}"
    with fresh_database(args.database_url) as database_url, tempfile.TemporaryDirectory() as tmp:
        env = gateway_env(database_url, args.redis_url, queue, Path(tmp))
        key = asyncio.run(seed_key(database_url, env["TOLLGATE_ENCRYPTION_KEYS"]))
        port = free_port()
        serve = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *serve],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", gateway)
            result = asyncio.run(measure(args, database_url, queue, key, port, gateway.pid))
        finally:
            gateway.terminate()
            try:
                gateway.wait(timeout=30)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
    print(table(result))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
