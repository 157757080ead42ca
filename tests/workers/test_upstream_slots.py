"""Upstream concurrency caps: the semaphore against real Redis, then real workers and simulator."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq.jobs import deserialize_job
from conftest import (
    REDIS_URL,
    SIM_KEY,
    Sim,
    bearer,
    make_settings,
    make_tenant_key,
    start_worker,
    stop_worker,
    wait_for_status,
)
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text

from gateway.app import create_app
from gateway.db import create_engine
from gateway.redis_keys import (
    parked_key,
    slot_lines_key,
    slots_epoch_key,
    upstream_backoff_key,
    upstream_cap_key,
    upstream_line_key,
    upstream_line_seen_key,
    upstream_slots_key,
)
from gateway.settings import Settings, UpstreamAccount
from workers.upstream_slots import UpstreamSlots, backoff_seconds

Client = AsyncTestClient[Any]


def keys_of(upstream: str) -> list[str]:
    return [
        upstream_slots_key(upstream),
        upstream_line_key(upstream),
        upstream_line_seen_key(upstream),
        upstream_backoff_key(upstream),
        upstream_cap_key(upstream),
        # The test's own queue (named after its upstream) and its bookkeeping.
        upstream,
        parked_key(upstream),
        slot_lines_key(upstream),
        slots_epoch_key(upstream),
    ]


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def upstream(redis: Redis) -> AsyncIterator[str]:
    """An upstream name of this test's own, so its keys are too."""
    name = f"test-{uuid.uuid4().hex}"
    yield name
    await redis.delete(*keys_of(name))


def slots_for(redis: Redis, upstream: str, lease: float = 5.0, poll: float = 0.1) -> UpstreamSlots:
    """Slots whose wake-up jobs go to a queue named after the test's upstream."""
    return UpstreamSlots(redis, lease_seconds=lease, poll_seconds=poll, queue_name=upstream)


async def queued_wakeups(redis: Redis, queue: str) -> list[str]:
    return [job.decode() for job in await redis.zrange(queue, 0, -1)]


# ---------------------------------------------------------------- the semaphore


async def test_slots_are_granted_up_to_the_cap_then_refused_with_a_wait(
    redis: Redis, upstream: str
) -> None:
    slots = slots_for(redis, upstream)
    assert (await slots.acquire(upstream, "a:0", cap=2, ticket_ms=1)).acquired
    assert (await slots.acquire(upstream, "b:0", cap=2, ticket_ms=2)).acquired
    refused = await slots.acquire(upstream, "c:0", cap=2, ticket_ms=3)
    assert not refused.acquired
    assert 0 < refused.wait_seconds <= 0.5
    assert await redis.zcard(upstream_slots_key(upstream)) == 2


async def test_after_redis_lost_the_slots_the_running_ones_are_restored_before_any_grant(
    redis: Redis, upstream: str
) -> None:
    restores = 0

    async def restore() -> None:
        # As the reconciler's restore_slots does from PostgreSQL: the running job's
        # slot back, then the marker, last.
        nonlocal restores
        restores += 1
        await asyncio.sleep(0.05)  # others ask meanwhile
        await redis.zadd(upstream_slots_key(upstream), {"running:0": time.time() * 1000 + 5000})
        await redis.set(slots_epoch_key(upstream), b"1")

    slots = UpstreamSlots(
        redis, lease_seconds=5.0, poll_seconds=0.1, queue_name=upstream, restore=restore
    )
    # No marker (Redis lost its state): four runs ask at once for the cap of 2.
    grants = await asyncio.gather(
        *(slots.acquire(upstream, f"new{i}:0", cap=2, ticket_ms=i) for i in range(4))
    )
    assert restores == 1
    # The running job is counted: one slot is left, for one of them.
    assert sum(grant.acquired for grant in grants) == 1
    assert await redis.zcard(upstream_slots_key(upstream)) == 2
    # With the marker back, asking restores nothing again.
    assert not (await slots.acquire(upstream, "new9:0", cap=2, ticket_ms=9)).acquired
    assert restores == 1


async def test_a_released_slot_goes_to_the_next_asker(redis: Redis, upstream: str) -> None:
    slots = slots_for(redis, upstream)
    assert (await slots.acquire(upstream, "a:0", cap=1, ticket_ms=1)).acquired
    assert not (await slots.acquire(upstream, "b:0", cap=1, ticket_ms=2)).acquired
    await slots.release(upstream, "a:0")
    assert (await slots.acquire(upstream, "b:0", cap=1, ticket_ms=2)).acquired
    # b left the line when it got its slot.
    assert await redis.zcard(upstream_line_key(upstream)) == 0


async def test_a_holder_asking_again_keeps_its_one_slot(redis: Redis, upstream: str) -> None:
    slots = slots_for(redis, upstream)
    first = await slots.acquire(upstream, "a:0", cap=1, ticket_ms=1)
    again = await slots.acquire(upstream, "a:0", cap=1, ticket_ms=1)
    assert (first.acquired, first.already_held) == (True, False)
    assert (again.acquired, again.already_held) == (True, True)
    assert await redis.zcard(upstream_slots_key(upstream)) == 1


async def test_a_holder_that_stops_renewing_loses_its_slot_after_the_lease(
    redis: Redis, upstream: str
) -> None:
    slots = slots_for(redis, upstream, lease=0.3)
    assert (await slots.acquire(upstream, "dead:0", cap=1, ticket_ms=1)).acquired
    refused = await slots.acquire(upstream, "b:0", cap=1, ticket_ms=2)
    assert not refused.acquired
    assert refused.wait_seconds <= 0.3  # no longer than the holder's lease
    await asyncio.sleep(0.35)
    assert (await slots.acquire(upstream, "b:0", cap=1, ticket_ms=2)).acquired
    assert await redis.zrange(upstream_slots_key(upstream), 0, -1) == [b"b:0"]


async def test_renewing_extends_the_lease(redis: Redis, upstream: str) -> None:
    slots = slots_for(redis, upstream, lease=0.4)
    assert (await slots.acquire(upstream, "a:0", cap=1, ticket_ms=1)).acquired
    await asyncio.sleep(0.25)
    assert await slots.renew(upstream, "a:0")
    await asyncio.sleep(0.25)  # past the first lease, within the renewed one
    assert not (await slots.acquire(upstream, "b:0", cap=1, ticket_ms=2)).acquired
    await asyncio.sleep(0.25)
    # Lapsed: renewing says so, and holds the slot again (the upstream job still runs).
    assert not await slots.renew(upstream, "a:0")
    assert await redis.zrange(upstream_slots_key(upstream), 0, -1) == [b"a:0"]


async def test_a_back_off_refuses_every_slot_until_it_lapses(redis: Redis, upstream: str) -> None:
    slots = slots_for(redis, upstream)
    assert await slots.back_off(upstream, 0.3) == 0.3
    refused = await slots.acquire(upstream, "a:0", cap=5, ticket_ms=1)
    assert not refused.acquired
    assert 0.2 < refused.wait_seconds <= 0.3
    await asyncio.sleep(0.35)
    assert (await slots.acquire(upstream, "a:0", cap=5, ticket_ms=1)).acquired


def test_back_off_lasts_the_retry_after_within_bounds() -> None:
    assert backoff_seconds(None) == 1.0
    assert backoff_seconds(2.5) == 2.5
    assert backoff_seconds(0) == 0.1  # "Retry-After: 0" must not become a tight loop
    assert backoff_seconds(10**9) == 600.0


async def test_waiters_are_served_in_submission_order(redis: Redis, upstream: str) -> None:
    slots = slots_for(redis, upstream)
    assert (await slots.acquire(upstream, "holder:0", cap=1, ticket_ms=1)).acquired
    # The later task happens to ask first; the earlier one still goes first.
    assert not (await slots.acquire(upstream, "late:0", cap=1, ticket_ms=3000)).acquired
    assert not (await slots.acquire(upstream, "early:0", cap=1, ticket_ms=2000)).acquired
    await slots.release(upstream, "holder:0")
    assert not (await slots.acquire(upstream, "late:0", cap=1, ticket_ms=3000)).acquired
    assert (await slots.acquire(upstream, "early:0", cap=1, ticket_ms=2000)).acquired
    await slots.release(upstream, "early:0")
    assert (await slots.acquire(upstream, "late:0", cap=1, ticket_ms=3000)).acquired


async def test_a_freed_slot_is_handed_to_the_head_of_the_line_and_its_job_queued(
    redis: Redis, upstream: str
) -> None:
    slots = slots_for(redis, upstream)
    assert (await slots.acquire(upstream, "holder:0", cap=1, ticket_ms=0)).acquired
    for i in range(3):
        assert not (await slots.acquire(upstream, f"w{i}:0", cap=1, ticket_ms=i + 1)).acquired
    # Parked: each waiter is in the line and in the parked set, and nothing is queued.
    assert await redis.zcard(upstream_line_key(upstream)) == 3
    assert await redis.hlen(parked_key(upstream)) == 3
    assert await queued_wakeups(redis, upstream) == []
    await slots.release(upstream, "holder:0")
    # The head holds the slot now, and its generation job is queued to run.
    assert await redis.zrange(upstream_slots_key(upstream), 0, -1) == [b"w0:0"]
    [woken] = await queued_wakeups(redis, upstream)
    assert woken.startswith("w0:0:w")
    assert await redis.exists(f"arq:job:{woken}")
    assert not await redis.hexists(parked_key(upstream), "w0:0")
    # Its job asks and finds the slot its own: granted, not "already held".
    grant = await slots.acquire(upstream, "w0:0", cap=1, ticket_ms=1)
    assert (grant.acquired, grant.already_held) == (True, False)
    # Leaving the line hands nothing on while the slot is taken.
    await slots.release(upstream, "w2:0")
    assert await redis.zrange(upstream_line_key(upstream), 0, -1) == [b"w1:0"]
    assert len(await queued_wakeups(redis, upstream)) == 1


async def test_a_woken_job_goes_ahead_of_the_jobs_queued_after_its_task(
    redis: Redis, upstream: str
) -> None:
    """Under a backlog the queue holds fresh jobs that will only park: a handed slot's
    job is queued at its task's submission, ahead of them, not behind the whole queue."""
    slots = slots_for(redis, upstream)
    assert (await slots.acquire(upstream, "holder:0", cap=1, ticket_ms=1000)).acquired
    grant = await slots.acquire(upstream, "parked:3", cap=1, ticket_ms=2000, model="flux-dev")
    assert not grant.acquired
    # Jobs of tasks submitted after it, still queued (arq scores by enqueue time, ms).
    now_ms = round(time.time() * 1000)
    await redis.zadd(upstream, {"later-1": now_ms - 5000, "later-2": now_ms - 4000})
    await slots.release(upstream, "holder:0")
    queued = await redis.zrange(upstream, 0, -1, withscores=True)
    assert [job.decode() for job, _ in queued][1:] == ["later-1", "later-2"]
    woken, score = queued[0]
    assert woken.decode().startswith("parked:3:w")
    assert score == 2000
    # Its job carries what its run needs before the slot: the model and the ticket.
    job = deserialize_job(await redis.get(f"arq:job:{woken.decode()}"))
    assert (job.function, job.args) == ("generate_task", ("parked", 3))
    assert job.kwargs == {"model": "flux-dev", "ticket_ms": 2000}


async def test_a_sweep_hands_on_the_slot_of_an_expired_lease(redis: Redis, upstream: str) -> None:
    slots = slots_for(redis, upstream, lease=0.2)
    assert (await slots.acquire(upstream, "dead:0", cap=1, ticket_ms=0)).acquired
    assert not (await slots.acquire(upstream, "next:0", cap=1, ticket_ms=1)).acquired
    assert await redis.smembers(slot_lines_key(upstream)) == {upstream.encode()}
    assert await slots.sweep() == 1  # still held: nothing to hand on
    await asyncio.sleep(0.25)
    assert await slots.sweep() == 0
    assert await redis.zrange(upstream_slots_key(upstream), 0, -1) == [b"next:0"]
    assert len(await queued_wakeups(redis, upstream)) == 1
    # No waiter left: the line is no longer swept.
    assert await redis.smembers(slot_lines_key(upstream)) == set()


async def test_an_upstream_job_already_running_takes_its_slot_past_the_cap(
    redis: Redis, upstream: str
) -> None:
    slots = slots_for(redis, upstream)
    assert (await slots.acquire(upstream, "a:0", cap=1, ticket_ms=1)).acquired
    assert (await slots.acquire(upstream, "resumed:1", cap=1, ticket_ms=2, running=True)).acquired
    await slots.release(upstream, "a:0")
    # Still one running upstream job for a cap of one: a new submit waits.
    assert not (await slots.acquire(upstream, "new:0", cap=1, ticket_ms=3)).acquired
    await slots.release(upstream, "resumed:1")
    assert (await slots.acquire(upstream, "new:0", cap=1, ticket_ms=3)).acquired


# ---------------------------------------------------------------- real workers, real upstream


def capped(database_url: str, simulator_url: str, storage: Path, cap: int) -> Settings:
    account = UpstreamAccount(base_url=simulator_url, api_key=SIM_KEY, max_concurrency=cap)  # type: ignore[arg-type]
    return make_settings(
        database_url, simulator_url, storage, upstreams={"krea": account, "siliconflow": account}
    )


def krea_slots(settings: Settings) -> str:
    """The slots of the env:krea channel in this test's namespace."""
    return f"{settings.queue_name}|env:krea"


async def submit(client: Client, key: str, prompt: str) -> str:
    response = await client.post(
        "/v1/images/generations",
        json={"model": "krea-2-medium", "prompt": prompt},
        headers=bearer(key),
    )
    assert response.status_code == 200, response.text
    task_id: str = response.json()["id"]
    return task_id


async def started_order(settings: Settings, task_ids: list[str]) -> list[str]:
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT id FROM tasks WHERE id = ANY(:ids) ORDER BY started_at"),
                {"ids": task_ids},
            )
            return [row[0] for row in rows]
    finally:
        await engine.dispose()


async def test_two_workers_never_run_more_than_the_accounts_cap_and_serve_in_order(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim
) -> None:
    settings = capped(database_url, simulator_url, tmp_path / "storage", cap=2)
    await simulator.configure(latency=1.0)
    _, key = await make_tenant_key(settings)
    workers = [start_worker(settings), start_worker(settings)]
    try:
        async with AsyncTestClient(
            app=create_app(settings), base_url="http://testserver.local"
        ) as c:
            task_ids = [await submit(c, key, f"capped {i}") for i in range(2)]
            # Once the cap is reached, every later task waits in the line.
            deadline = time.monotonic() + 5
            while (await simulator.stats())["submits"] < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            task_ids += [await submit(c, key, f"capped {i}") for i in range(2, 8)]
            done = [
                await wait_for_status(c, key, task_id, {"completed", "failed"}, wait=25)
                for task_id in task_ids
            ]
    finally:
        for worker in workers:
            await stop_worker(*worker)
    assert [task["status"] for task in done] == ["completed"] * 8, done
    stats = await simulator.stats()
    assert stats["submits"] == 8
    assert stats["max_jobs_active"] == 2
    # Waiting tasks were served in the order they were submitted, two at a time.
    order = await started_order(settings, task_ids)
    for pair in range(0, 8, 2):
        assert set(order[pair : pair + 2]) == set(task_ids[pair : pair + 2]), pair


async def test_an_upstream_429_holds_new_submits_back_and_tasks_wait_rather_than_fail(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim, redis: Redis
) -> None:
    settings = capped(database_url, simulator_url, tmp_path / "storage", cap=8)
    await simulator.configure(error_kind="submit_429", retry_after=1)
    _, key = await make_tenant_key(settings)
    worker, running = start_worker(settings)
    try:
        async with AsyncTestClient(
            app=create_app(settings), base_url="http://testserver.local"
        ) as c:
            first = await submit(c, key, "rate limited")
            deadline = time.monotonic() + 5
            while not await redis.exists(upstream_backoff_key(krea_slots(settings))):
                assert time.monotonic() < deadline, "the 429 set no back-off"
                await asyncio.sleep(0.02)
            backed_off_at = time.monotonic()
            later = [await submit(c, key, f"behind the back-off {i}") for i in range(3)]
            # Free slots, but the account backs off: the later tasks have not reached it.
            await asyncio.sleep(max(0.0, backed_off_at + 0.5 - time.monotonic()))
            assert (await simulator.stats())["submits"] == 1
            await simulator.configure(error_kind="none")
            done = [
                await wait_for_status(c, key, task_id, {"completed", "failed"}, wait=15)
                for task_id in [first, *later]
            ]
    finally:
        await stop_worker(worker, running)
    assert [task["status"] for task in done] == ["completed"] * 4, done
    # At most one more 429 for each task (each waited the second out), then one success.
    assert (await simulator.stats())["submits"] <= 1 + 4 + 4


async def test_a_slot_left_by_a_killed_worker_frees_itself_after_a_lease(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim, redis: Redis
) -> None:
    settings = capped(database_url, simulator_url, tmp_path / "storage", cap=1)
    slots = UpstreamSlots(
        redis,
        lease_seconds=settings.lease_seconds,
        poll_seconds=settings.poll_interval_seconds,
        queue_name=settings.queue_name,
    )
    # A worker takes the only slot and dies: nobody releases or renews it.
    assert (await slots.acquire(krea_slots(settings), "killed:0", cap=1, ticket_ms=0)).acquired
    killed_at = time.monotonic()
    _, key = await make_tenant_key(settings)
    worker, running = start_worker(settings)
    try:
        async with AsyncTestClient(
            app=create_app(settings), base_url="http://testserver.local"
        ) as c:
            task_id = await submit(c, key, "after the crash")
            await asyncio.sleep(1.0)
            waiting = (await c.get(f"/v1/tasks/{task_id}", headers=bearer(key))).json()
            assert waiting["status"] == "pending"
            assert (await simulator.stats())["submits"] == 0
            done = await wait_for_status(c, key, task_id, {"completed", "failed"}, wait=15)
    finally:
        await slots.release(krea_slots(settings), "killed:0")
        await stop_worker(worker, running)
    assert done["status"] == "completed", done
    assert time.monotonic() - killed_at >= settings.lease_seconds
    assert (await simulator.stats())["submits"] == 1
