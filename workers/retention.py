"""Retention: a task's result files are deleted once its links have expired and
``TOLLGATE_RESULT_GRACE_SECONDS`` more have passed, on either storage backend.

Rules:
- Which tasks: finished ones whose files are not yet deleted
  (``results_deleted_at IS NULL``), once ``results_expire_at`` (completed) or
  ``finished_at`` (failed, cancelled: a run may have stored images before the task
  ended otherwise) is older than the grace period.
- What goes: every object under ``<task id>/``, whatever attempt wrote it.
- Delete first, then mark the row: a run that dies in between deletes nothing
  twice that matters (the next run finds the folder empty and marks it), and a
  task is never marked while its files remain. Safe to run twice, or on two
  workers at once.
- A task whose files are gone keeps its row; its links had expired already, so
  they answer ``410 link_expired`` (presigned links: the bucket's own expiry
  answer, 403).
- The fleet runs it once per ``TOLLGATE_RETENTION_INTERVAL_SECONDS``: the cron
  ticks and a Redis key living one interval picks the run, as the ledger check does.
  An unreachable store ends the run; the next one carries on where it stopped.
"""

import logging
import time
from typing import Any

from arq import cron
from arq.connections import ArqRedis
from sqlalchemy import text

from gateway import metrics
from gateway.redis_keys import retention_key
from gateway.settings import Settings
from gateway.storage import Deleted, StorageUnavailable
from workers.deps import WorkerDeps

logger = logging.getLogger("tollgate.retention")

BATCH = 200

_DUE = text(
    "SELECT id FROM tasks "
    "WHERE finished_at IS NOT NULL AND results_deleted_at IS NULL "
    "AND COALESCE(results_expire_at, finished_at) < now() - make_interval(secs => :grace) "
    "ORDER BY COALESCE(results_expire_at, finished_at) LIMIT :batch"
)
_MARK = text(
    "UPDATE tasks SET results_deleted_at = now() WHERE id = :id AND results_deleted_at IS NULL"
)


async def delete_expired_results(deps: WorkerDeps, *, budget_seconds: float = 50.0) -> Deleted:
    """Delete the files of every task that is due, for at most ``budget_seconds``;
    the files and bytes deleted."""
    grace = deps.settings.result_grace_seconds
    storage = deps.storage
    files = size = tasks = 0
    stop_at = time.monotonic() + budget_seconds
    while time.monotonic() < stop_at:
        async with deps.engine.connect() as conn:
            due = (await conn.execute(_DUE, {"grace": grace, "batch": BATCH})).scalars().all()
        for task_id in due:
            try:
                deleted = await storage.delete_task(task_id)
            except StorageUnavailable:
                metrics.storage_failed(storage.backend, "delete")
                raise
            async with deps.engine.begin() as conn:
                await conn.execute(_MARK, {"id": task_id})
            if deleted.files:
                metrics.results_deleted(storage.backend, deleted.files, deleted.bytes)
            files += deleted.files
            size += deleted.bytes
            tasks += 1
            if time.monotonic() >= stop_at:
                break
        if len(due) < BATCH:
            break
    if tasks:
        logger.info(
            "retention: %d task(s), %d file(s), %d byte(s) deleted",
            tasks,
            files,
            size,
            extra={"tasks": tasks, "files": files, "bytes": size},
        )
    return Deleted(files=files, bytes=size)


async def retention(ctx: dict[str, Any]) -> str:
    """arq cron job: run retention unless the fleet ran it within the interval."""
    deps: WorkerDeps = ctx["deps"]
    redis: ArqRedis = ctx["redis"]
    interval = deps.settings.retention_interval_seconds
    claimed = await redis.set(retention_key(deps.settings.queue_name), "1", nx=True, ex=interval)
    if not claimed:
        return "skipped: ran within the interval"
    try:
        deleted = await delete_expired_results(deps, budget_seconds=max(1.0, interval - 5.0))
    except StorageUnavailable as exc:
        logger.warning("retention: the result store is unavailable (%s); next run retries", exc)
        return "stopped: store unavailable"
    return f"deleted {deleted.files} file(s), {deleted.bytes} byte(s)"


def retention_cron(settings: Settings) -> list[Any]:
    """The cron job, or none when retention is off (interval 0)."""
    interval = settings.retention_interval_seconds
    if interval == 0:
        return []
    # Tick often enough to honour short intervals; the Redis key spaces the runs.
    seconds = set(range(0, 60, interval)) if interval < 60 else {45}
    return [
        cron(
            retention,
            name="retention",
            second=seconds,
            run_at_startup=False,
            unique=True,
            timeout=max(60, interval),
        )
    ]
