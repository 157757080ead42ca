"""Workers killed with SIGKILL: no task stays stranded, whatever arq's keys say.

Workers run as their own processes (``python -m workers``) against the test's
PostgreSQL, Redis and the session's simulator, and are killed with SIGKILL: no
shutdown code runs, as when a machine or a container dies.

The dangerous moment is between arq handing a job to a worker (it sets the job's
"in progress" key, which lives for the worker's longest job timeout + 10 s) and
the job's first write (the claim): a task left there is still ``pending``, and a
re-queue under the same job id is refused by arq as a duplicate.
"""

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ROOT,
    SIM_KEY,
    Sim,
    bearer,
    cli_env,
    make_settings,
    make_tenant_key,
    scalar,
    start_worker,
    stop_worker,
)
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.redis_keys import arq_in_progress_key, generate_job_id
from gateway.settings import Settings, UpstreamAccount

Client = AsyncTestClient[Any]
MODEL = "krea-2-medium"


@pytest.fixture
def settings(database_url: str, simulator_url: str, tmp_path: Path) -> Settings:
    return make_settings(
        database_url,
        simulator_url,
        tmp_path / "storage",
        requeue_pending_after_seconds=2.0,
        metrics_port=0,
    )


def worker_env(settings: Settings) -> dict[str, str]:
    """Every setting of ``settings`` as the worker process reads it from its environment."""
    env = cli_env(settings)
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        text_value = value if isinstance(value, str) else json.dumps(value)
        env[f"TOLLGATE_{name.upper()}"] = text_value
    return env


@contextlib.asynccontextmanager
async def worker_process(
    settings: Settings, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A ``tollgate-worker`` process; SIGKILLed on the way out if still alive."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers",
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


async def wait_until_final(engine: AsyncEngine, task_ids: list[str], wait: float) -> float:
    """Seconds until every task is completed; fails naming the ones that are not."""
    started = time.monotonic()
    found: dict[str, str] = {}
    while time.monotonic() - started < wait:
        found = await statuses(engine, task_ids)
        if all(status == "completed" for status in found.values()):
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    stuck = {task: status for task, status in found.items() if status != "completed"}
    raise AssertionError(f"{len(stuck)} task(s) not completed after {wait}s: {stuck}")


async def test_a_worker_killed_between_taking_a_job_and_claiming_its_task_strands_nothing(
    settings: Settings, engine: AsyncEngine, simulator: Sim, tmp_path: Path
) -> None:
    _, key = await make_tenant_key(settings)
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        task_id = await submit(c, key, "killed before its claim")
    attempt = await scalar(engine, "SELECT attempt FROM tasks WHERE id = :id", id=task_id)
    in_progress = arq_in_progress_key(generate_job_id(task_id, attempt))
    redis = Redis.from_url(settings.redis_url)
    try:
        # Hold the task's row: the worker's claim, its first write, waits on the lock.
        async with engine.connect() as locker:
            await locker.execute(
                text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": task_id}
            )
            async with worker_process(settings, tmp_path / "worker.log") as proc:
                deadline = time.monotonic() + 30
                while not await _claim_waiting_on_lock(engine, task_id):
                    assert proc.returncode is None, (tmp_path / "worker.log").read_text()
                    assert time.monotonic() < deadline, "the worker never reached its claim"
                    await asyncio.sleep(0.05)
                # arq has handed the job to the worker, which has written nothing yet.
                assert await redis.exists(in_progress)
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            # The claim is one autocommit statement: sent before the kill, it would still
            # land once the lock is free (a claim of a dead worker, which its lease's end
            # recovers). Killed before its claim: the claim never reaches the database.
            await _end_waiting_claims(engine)
            await locker.rollback()
        killed_at = time.monotonic()
        assert await scalar(engine, "SELECT status FROM tasks WHERE id = :id", id=task_id) == (
            "pending"
        )
        # arq still counts the job in progress, for its longest job timeout: a re-queue
        # under the same id would be refused for the next hour.
        assert await redis.pttl(in_progress) > 600_000

        arq_worker, running = start_worker(settings)
        try:
            await wait_until_final(engine, [task_id], wait=60)
        finally:
            await stop_worker(arq_worker, running)
        assert time.monotonic() - killed_at < 60
        assert await redis.exists(in_progress)  # untouched: the new attempt ran instead
        assert (await simulator.stats())["submits"] == 1
    finally:
        await redis.aclose()


async def _end_waiting_claims(engine: AsyncEngine) -> None:
    """End the database sessions of claims waiting on a lock (and wait until they have)."""
    await scalar(
        engine,
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND query ILIKE 'UPDATE tasks%'"
        " AND datname = current_database()",
    )


async def _claim_waiting_on_lock(engine: AsyncEngine, task_id: str) -> bool:
    """Whether another session is blocked on a lock while updating the task (its claim)."""
    found = await scalar(
        engine,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query ILIKE 'UPDATE tasks%' AND datname = current_database()",
    )
    return bool(found)


async def test_tasks_all_complete_through_a_loop_of_worker_kills(
    settings: Settings, engine: AsyncEngine, simulator: Sim, tmp_path: Path
) -> None:
    """Workers SIGKILLed again and again while tasks are in flight: every task completes,
    each within a minute of the last kill."""
    await simulator.configure(latency=0.5)
    _, key = await make_tenant_key(settings)
    rng = random.Random(13)
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        task_ids = [await submit(c, key, f"kill loop {i}") for i in range(30)]
    log = tmp_path / "workers.log"
    for _ in range(8):
        async with worker_process(settings, log) as proc:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    last_kill = time.monotonic()
    async with worker_process(settings, log):
        await wait_until_final(engine, task_ids, wait=60)
    assert time.monotonic() - last_kill < 60
    charged = await scalar(
        engine,
        "SELECT count(*) FROM tasks WHERE id = ANY(:ids) AND credits_charged_micros > 0",
        ids=task_ids,
    )
    assert charged == len(task_ids)


async def test_a_killed_workers_polling_tasks_go_on_within_seconds_with_their_slots(
    database_url: str, simulator_url: str, engine: AsyncEngine, simulator: Sim, tmp_path: Path
) -> None:
    """A worker killed while its tasks poll their upstream jobs: once it has not beaten for
    ``worker_dead_after_seconds``, another worker hands those tasks to new attempts that
    resume the same jobs, holding the dead runs' slots, long before the dead runs' leases
    (30 s) run out. Tasks waiting for those slots run as soon as the resumed ones end."""
    cap = 4
    account = UpstreamAccount(base_url=simulator_url, api_key=SIM_KEY, max_concurrency=cap)  # type: ignore[arg-type]
    settings = make_settings(
        database_url,
        simulator_url,
        tmp_path / "storage",
        upstreams={"krea": account, "siliconflow": account},
        lease_seconds=30.0,
        reconcile_interval_seconds=10,
        requeue_pending_after_seconds=20.0,
        metrics_port=0,
    )
    assert settings.worker_dead_after_seconds == 5
    await simulator.configure(latency=4.0)
    _, key = await make_tenant_key(settings)
    log = tmp_path / "workers.log"
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        running = [await submit(c, key, f"polling at the kill {i}") for i in range(cap)]
        async with worker_process(settings, log) as proc:
            deadline = time.monotonic() + 20
            while await jobs_recorded(engine, running) < cap:
                assert time.monotonic() < deadline, "the upstream jobs were never recorded"
                await asyncio.sleep(0.05)
            jobs = await job_ids(engine, running)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        killed = time.monotonic()
        waiting = [await submit(c, key, f"waiting for a slot {i}") for i in range(cap)]
        async with worker_process(settings, log):
            took = await wait_until_final(engine, running + waiting, wait=25)
    after_kill = time.monotonic() - killed
    print(f"all {2 * cap} completed {after_kill:.1f}s after the kill ({took:.1f}s of waiting)")
    # The killed runs' jobs were resumed, not submitted again.
    assert await job_ids(engine, running) == jobs
    stats = await simulator.stats()
    # The resumed tasks kept the dead runs' slots: the account never ran more than its cap.
    assert stats["max_jobs_active"] <= cap, stats
    assert "task(s) handed on to a new attempt" in log.read_text()


async def job_ids(engine: AsyncEngine, task_ids: list[str]) -> dict[str, str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT id, upstream_job_id FROM tasks WHERE id = ANY(:ids)"), {"ids": task_ids}
        )
        return {row[0]: row[1] for row in rows}


async def jobs_recorded(engine: AsyncEngine, task_ids: list[str]) -> int:
    return int(
        await scalar(
            engine,
            "SELECT count(*) FROM tasks WHERE id = ANY(:ids) AND upstream_job_id IS NOT NULL",
            ids=task_ids,
        )
    )
