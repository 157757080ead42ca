"""The reconciler: PostgreSQL is the source of truth, the queue is rebuilt from it.

Runs on a cron in every worker process (arq runs each tick once across all
workers). Each tick:

1. fails open tasks past their deadline, releasing their holds (the sweeper);
2. hands tasks whose lease ran out (their worker died or hung) to a new
   attempt and queues that attempt at once, so a killed worker's task runs
   again within ``lease_seconds + reconcile_interval_seconds``;
3. re-queues pending tasks older than ``requeue_pending_after_seconds``: if
   their job is still queued arq refuses the duplicate id, and if Redis lost
   it, this puts it back.
"""

import logging
from typing import Any

from arq.connections import ArqRedis

from gateway.callbacks import service as callbacks
from gateway.queue import enqueue_generation
from gateway.tasks import lifecycle
from workers.deps import WorkerDeps

logger = logging.getLogger("tollgate.reconciler")

BATCH = 500


async def reconcile(ctx: dict[str, Any]) -> dict[str, int]:
    deps: WorkerDeps = ctx["deps"]
    redis: ArqRedis = ctx["redis"]
    settings = deps.settings
    async with deps.engine.begin() as conn:
        overdue = await lifecycle.fail_overdue(conn, settings.task_deadline_seconds, BATCH)
        reclaimed = await lifecycle.reclaim_expired_leases(conn, BATCH)
        pending = await lifecycle.stale_pending(conn, settings.requeue_pending_after_seconds, BATCH)
    for task_id in overdue:
        await callbacks.queue_first_attempts(
            redis, settings.callback_queue_name, deps.engine, task_id
        )
    requeued = 0
    for task_id, attempt in [*reclaimed, *pending]:
        if await enqueue_generation(redis, settings.queue_name, task_id, attempt):
            requeued += 1
    if overdue or reclaimed or requeued:
        logger.info(
            "reconciled: %d overdue failed, %d leases reclaimed, %d jobs re-queued",
            len(overdue),
            len(reclaimed),
            requeued,
        )
    return {"overdue": len(overdue), "reclaimed": len(reclaimed), "requeued": requeued}
