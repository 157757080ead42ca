"""The reconciler: PostgreSQL is the source of truth, the queue is rebuilt from it.

Runs on a cron in every worker process (arq runs each tick once across all
workers). Each tick:

1. fails open tasks past their deadline, releasing their holds (the sweeper),
   and has the upstream job of each that had one cancelled (``cancel_upstream``);
2. hands tasks whose lease ran out (their worker died or hung) to a new
   attempt and queues that attempt at once, so a killed worker's task runs
   again within ``lease_seconds + reconcile_interval_seconds``;
3. re-queues pending tasks older than ``requeue_pending_after_seconds``: if
   their job is still queued arq refuses the duplicate id, and if Redis lost
   it, this puts it back;
4. gives such a task whose job arq has already handed to a worker a new
   attempt, queued under a new job id. A worker claims its task moments after
   arq hands it the job, so a job "in progress" on a task still unclaimed that
   long belongs to a worker that died in between; arq would keep that job id
   "in progress" for its longest job timeout (an hour, for the ledger check's
   cron) and refuse the re-queue as a duplicate. A live worker that is in fact
   just starting loses nothing: its claim finds the new attempt and stops.
   So a task stranded that way runs again within
   ``requeue_pending_after_seconds + reconcile_interval_seconds`` of its
   submission, or one reconcile interval of the worker's death if later.
5. vacuums the two small tables whose rows every submit and every settlement
   update (``HOT_TABLES``: the tenants' balances and in-flight counts, the keys'
   spend), whatever the server's autovacuum does: a hot tenant's row updated a
   thousand times a second leaves versions behind that every later update walks
   past, and its reservation grows several times dearer within minutes
   (docs/performance.md, tenth round).

A pending task parked in an upstream slot's line has no job on purpose
(``workers/upstream_slots.py``): steps 3 and 4 leave it alone, and page past
it, so a backlog of any size is looked through. When Redis has lost its state
(its slots marker is gone), the tick first puts the running tasks' slots back
from PostgreSQL, so the tasks queued again, which park again in submission
order, cannot overrun the caps. A run asking for a slot before the tick does
the same first (``restore_slots`` is the slots' ``restore``).

Steps 3 and 4 wait for a task to be ``requeue_pending_after_seconds`` old, since
its job may simply be queued still. When Redis has lost its state there is no
such doubt: every worker checks each second that the queue's marker is there
(``recover_lost_queue``), and the first to find it gone queues every waiting task
again at once, oldest first, so a Redis restarted without persistence costs the
backlog a second, not the requeue age and a tick.
"""

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.callbacks import service as callbacks
from gateway.queue import enqueue_generation, enqueue_upstream_cancel, generation_in_progress
from gateway.redis_keys import (
    parked_key,
    queue_epoch_key,
    slot_name,
    slots_epoch_key,
    upstream_slots_key,
)
from gateway.settings import Settings
from gateway.tasks import lifecycle, recovery
from workers.deps import WorkerDeps
from workers.liveness import Liveness

logger = logging.getLogger("tollgate.reconciler")

BATCH = 500
# The tables whose few rows every submit and settlement updates (step 5 above).
HOT_TABLES = ("tenants", "key_spend")
# Pages of stale pending tasks looked through per tick (parked ones are skipped).
MAX_PAGES = 40

# KEYS: a channel's slots. ARGV: holder, lease ms. A running task's slot, put back.
_RESTORE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'NX', now + tonumber(ARGV[2]), ARGV[1])
"""


async def restore_slots(redis: Redis, engine: AsyncEngine, settings: Settings) -> int | None:
    """Redis lost its state (no slots marker): put the running tasks' slots back from
    PostgreSQL, then set the marker. None when Redis still has them.

    The marker goes last: the acquire script grants nothing while it is missing (its
    caller restores first, ``workers/upstream_slots.py``), so no slot is handed out
    before the running jobs are counted again. Restorers running at once add the
    same holders (``NX``), harmlessly.
    """
    queue = settings.queue_name
    marker = slots_epoch_key(queue)
    if await redis.exists(marker):
        return None
    async with engine.connect() as conn:
        holding = await recovery.holding_slots(conn)
    script = redis.register_script(_RESTORE_SLOT)
    lease_ms = round(settings.lease_seconds * 1000)
    restored = 0
    for task_id, attempt, channel_id in holding:
        key = upstream_slots_key(slot_name(queue, channel_id))
        restored += int(await script(keys=[key], args=[f"{task_id}:{attempt}", lease_ms]))
    await redis.set(marker, b"1")
    if restored:
        logger.warning("redis had lost the upstream slots: %d restored from PostgreSQL", restored)
    return restored


async def _hand_on_expired(
    deps: WorkerDeps,
    redis: ArqRedis,
    before_queueing: Callable[[str, int], Awaitable[None]] | None = None,
) -> int:
    """Hand tasks whose lease ran out to a new attempt and queue it (``before_queueing``
    first, with the task and its new attempt); how many were queued."""
    async with deps.engine.begin() as conn:
        reclaimed = await lifecycle.reclaim_expired_leases(conn, BATCH)
    queued = 0
    for task_id, attempt in reclaimed:
        if before_queueing is not None:
            await before_queueing(task_id, attempt)
        if await enqueue_generation(redis, deps.settings.queue_name, task_id, attempt):
            queued += 1
    return queued


async def _unparked(
    redis: ArqRedis, queue_name: str, rows: list[tuple[str, int]]
) -> list[tuple[str, int]]:
    """``rows`` (task, attempt) but those parked in a slot's line (they have no job)."""
    if not rows:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for task_id, attempt in rows:
            pipe.hexists(parked_key(queue_name), f"{task_id}:{attempt}")
        parked = await pipe.execute()
    return [row for row, is_parked in zip(rows, parked, strict=True) if not is_parked]


async def _unparked_pages(
    deps: WorkerDeps, redis: ArqRedis, age: float
) -> AsyncGenerator[list[tuple[str, int]], None]:
    """Pending tasks at least ``age`` seconds old, oldest first, a page of ``BATCH`` rows
    at a time, but those parked in a slot's line."""
    offset = 0
    while True:
        async with deps.engine.connect() as conn:
            rows = await recovery.stale_pending(conn, age, BATCH, offset=offset)
        offset += len(rows)
        yield await _unparked(redis, deps.settings.queue_name, rows)
        if len(rows) < BATCH:
            return


async def _stale_unparked(deps: WorkerDeps, redis: ArqRedis) -> list[tuple[str, int]]:
    """Stale pending tasks, oldest first, but those parked in a slot's line: ``BATCH`` at
    most, from ``MAX_PAGES`` pages at most."""
    found: list[tuple[str, int]] = []
    age = deps.settings.requeue_pending_after_seconds
    async with contextlib.aclosing(_unparked_pages(deps, redis, age)) as pages:
        read = 0
        async for page in pages:
            found += page
            read += 1
            if read >= MAX_PAGES or len(found) >= BATCH:
                break
    return found[:BATCH]


async def recover_lost_queue(deps: WorkerDeps, redis: ArqRedis) -> int | None:
    """Redis lost its state (the queue's marker is gone): put the running tasks' slots
    back, hand tasks whose lease ran out to a new attempt, then queue every waiting task
    again, oldest first, whatever its age. None when
    Redis still holds the queue (one ``SET NX``: this runs every second in every worker).

    The marker is set first, by one worker only; the others find it and do nothing. A
    queued or running job refuses its duplicate (``enqueue_generation``), and a parked
    task is left in its line. A recovery cut short by an outage takes the marker away
    again, so the next check starts over; what it had queued is refused as duplicates.
    """
    settings = deps.settings
    marker = queue_epoch_key(settings.queue_name)
    if not await redis.set(marker, b"1", nx=True):
        return None
    try:
        await restore_slots(redis, deps.engine, settings)
        # Runs an outage stopped handed their tasks back; their retries were lost too.
        requeued = await _hand_on_expired(deps, redis)
        async for page in _unparked_pages(deps, redis, 0):
            for task_id, attempt in page:
                if await enqueue_generation(redis, settings.queue_name, task_id, attempt):
                    requeued += 1
    except BaseException:
        with contextlib.suppress(Exception):
            await redis.delete(marker)
        raise
    if requeued:
        logger.warning(
            "redis had lost its queue: %d waiting tasks queued again from PostgreSQL", requeued
        )
    return requeued


async def reap_dead_runs(deps: WorkerDeps, redis: ArqRedis, liveness: Liveness) -> int:
    """The runs whose worker stopped beating (``workers/liveness.py``): a task whose upstream
    job id is recorded goes to a new attempt at once, which resumes that job with the dead
    run's upstream slot. One that may have been mid-submit (a synchronous channel's whole
    generation is its submit) keeps its lease, so that a worker only slow to beat never
    has its task submitted twice, but its slot goes to the next task in line: a dead
    worker's call holds no job on the account. Returns how many were handed on."""
    dead = await liveness.dead_runs()
    if not dead:
        return 0
    settings = deps.settings
    handed: dict[str, tuple[str, int]] = {}  # task → (its job's channel, the dead attempt)
    for holder, _ in dead:
        task_id, _, number = holder.rpartition(":")
        found = await lifecycle.hand_on_dead(deps.statements, task_id, int(number))
        channel_id = None if found is None else found[0]
        if found is None or channel_id is None:
            continue
        if found[1]:
            handed[task_id] = (channel_id, int(number))
        elif deps.slots is not None:
            await deps.slots.release(slot_name(settings.queue_name, channel_id), holder)
    await liveness.forget([holder for holder, _ in dead])

    async def pass_slot_on(task_id: str, attempt: int) -> None:
        if task_id in handed and deps.slots is not None:
            channel_id, dead_attempt = handed[task_id]
            await deps.slots.pass_on(
                slot_name(settings.queue_name, channel_id),
                f"{task_id}:{dead_attempt}",
                f"{task_id}:{attempt}",
            )

    if handed:
        await _hand_on_expired(deps, redis, pass_slot_on)
    logger.warning(
        "%d run(s) of %d worker(s) that stopped beating: %d task(s) handed on to a new attempt,"
        " the others' slots freed",
        len(dead),
        len({worker for _, worker in dead}),
        len(handed),
    )
    return len(handed)


async def vacuum_hot_tables(engine: AsyncEngine) -> bool:
    """VACUUM ``HOT_TABLES`` (outside a transaction, as VACUUM must be), passing over one
    another vacuum holds. False, and a warning, if it failed: the tick goes on without it.
    A role that does not own the tables gets PostgreSQL's warning and vacuums nothing."""
    try:
        async with engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in HOT_TABLES:
                await autocommit.execute(text(f"VACUUM (SKIP_LOCKED) {table}"))
    except (SQLAlchemyError, OSError) as exc:
        logger.warning("vacuuming %s failed: %s", ", ".join(HOT_TABLES), exc)
        return False
    return True


async def reconcile(ctx: dict[str, Any]) -> dict[str, int]:
    deps: WorkerDeps = ctx["deps"]
    redis: ArqRedis = ctx["redis"]
    settings = deps.settings
    await restore_slots(redis, deps.engine, settings)
    async with deps.engine.begin() as conn:
        overdue = await lifecycle.fail_overdue(conn, settings.task_deadline_seconds, BATCH)
        abandoned = await recovery.upstream_jobs(conn, overdue)
        reclaimed = await lifecycle.reclaim_expired_leases(conn, BATCH)
    pending = await _stale_unparked(deps, redis)
    for task_id in overdue:
        await callbacks.queue_first_attempts(
            redis, settings.callback_queue_name, deps.engine, task_id
        )
    for task_id, channel_id, job_id in abandoned:
        # The job may still run, and cost, upstream: have it cancelled there.
        await enqueue_upstream_cancel(
            redis, settings.queue_name, task_id, channel_id, job_id, reason="deadline"
        )
    waiting, stranded = [], []
    for task_id, attempt in pending:
        if not await generation_in_progress(redis, task_id, attempt):
            waiting.append((task_id, attempt))
            continue
        async with deps.engine.begin() as conn:
            restarted = await lifecycle.restart_unclaimed(conn, task_id, attempt)
        if restarted is not None:
            stranded.append((task_id, restarted))
    requeued = 0
    for task_id, attempt in [*reclaimed, *waiting, *stranded]:
        if await enqueue_generation(redis, settings.queue_name, task_id, attempt):
            requeued += 1
    await vacuum_hot_tables(deps.engine)
    if overdue or reclaimed or requeued:
        logger.info(
            "reconciled: %d overdue failed, %d leases reclaimed, %d stranded jobs restarted,"
            " %d jobs re-queued",
            len(overdue),
            len(reclaimed),
            len(stranded),
            requeued,
        )
    return {
        "overdue": len(overdue),
        "reclaimed": len(reclaimed),
        "restarted": len(stranded),
        "requeued": requeued,
    }
