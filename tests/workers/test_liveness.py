"""Liveness: the runs of a worker that stopped beating are handed on, unless mid-submit;
the slots of those are freed.

Real PostgreSQL and Redis; the dead worker is a ``Liveness`` that beat once and then
never again, its runs two tasks claimed by hand: one polling its upstream job, one
whose job id is not recorded yet (it may be in the middle of its submit).
"""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import bearer, make_settings, make_tenant_key, worker_deps
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import Statements
from gateway.redis_keys import generate_job_id, runs_key, slot_name, upstream_slots_key, workers_key
from gateway.settings import Settings
from gateway.tasks import lifecycle
from workers.deps import WorkerDeps
from workers.liveness import Liveness
from workers.reconciler import reap_dead_runs
from workers.upstream_slots import UpstreamSlots

Client = AsyncTestClient[Any]
MODEL = "krea-2-medium"


@pytest.fixture
def settings(database_url: str, simulator_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, simulator_url, tmp_path / "storage", lease_seconds=30.0)


@pytest.fixture
async def deps(settings: Settings, engine: AsyncEngine, redis: Redis) -> AsyncIterator[WorkerDeps]:
    slots = UpstreamSlots(
        redis, lease_seconds=30.0, poll_seconds=1.0, queue_name=settings.queue_name
    )
    async with httpx.AsyncClient(trust_env=False) as http:
        yield worker_deps(settings, engine, http, slots=slots)
    queue = settings.queue_name
    await redis.delete(workers_key(queue), runs_key(queue))


async def row(engine: AsyncEngine, task_id: str) -> tuple[str, int, bool]:
    """(status, attempt, whether a live lease holds it)."""
    async with engine.connect() as conn:
        found = await conn.execute(
            text(
                "SELECT status, attempt, coalesce(lease_expires_at > now(), false)"
                " FROM tasks WHERE id = :id"
            ),
            {"id": task_id},
        )
        status, attempt, leased = found.one()
    return status, attempt, leased


async def test_a_dead_workers_polling_run_is_handed_on_with_its_slot_and_a_submitting_one_waits(
    client: Client, settings: Settings, engine: AsyncEngine, redis: Redis, deps: WorkerDeps
) -> None:
    _, key = await make_tenant_key(settings)
    ids = []
    for prompt in ("polling", "submitting"):
        response = await client.post(
            "/v1/images/generations", json={"model": MODEL, "prompt": prompt}, headers=bearer(key)
        )
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    polling, submitting = ids
    route = (await deps.directory.candidates(MODEL))[0]
    db = Statements(engine)
    for task_id, job_id in ((polling, "job-polling"), (submitting, None)):
        assert await lifecycle.claim(db, task_id, 0, 30.0) is not None
        assert await lifecycle.record_route(
            db, task_id, 0, 30.0, channel_id=route.id, upstream_job_id=job_id, can_cancel=False
        )
    assert deps.slots is not None
    slot = slot_name(settings.queue_name, route.id)
    for task_id in ids:
        assert (await deps.slots.acquire(slot, f"{task_id}:0", cap=4, ticket_ms=0)).acquired

    dead = Liveness(redis, settings.queue_name, dead_after_seconds=0.3)
    await dead.beat()
    await dead.running(f"{polling}:0")
    await dead.running(f"{submitting}:0")
    alive = Liveness(redis, settings.queue_name, dead_after_seconds=0.3)
    await alive.beat()
    assert await reap_dead_runs(deps, redis, alive) == 0  # it beat just now
    await asyncio.sleep(0.4)
    await alive.beat()

    assert await reap_dead_runs(deps, redis, alive) == 1
    # The polling task: a new attempt, queued, holding the dead run's slot.
    assert await row(engine, polling) == ("processing", 1, False)
    assert await redis.exists(f"arq:job:{generate_job_id(polling, 1)}")
    holders = {m.decode() for m in await redis.zrange(upstream_slots_key(slot), 0, -1)}
    assert holders == {f"{polling}:1"}
    # The one that may be mid-submit keeps its lease, since a second submit could pay
    # twice; its slot went back (above: only the polling task's new attempt holds one).
    assert await row(engine, submitting) == ("processing", 0, True)
    # Both runs are dealt with: the next look finds nothing.
    assert await redis.hlen(runs_key(settings.queue_name)) == 0
    assert await reap_dead_runs(deps, redis, alive) == 0
    # Nothing left open for a later test's workers to find.
    for task_id, attempt in ((polling, 1), (submitting, 0)):
        assert await lifecycle.fail(db, task_id, attempt, "test", "ended by the test")
