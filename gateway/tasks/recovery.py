"""What the reconciler reads to find tasks whose job or slot Redis may have lost.

Plain reads, no transitions: those are in ``lifecycle.py``, fenced by attempt.
"""

from datetime import timedelta

from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.tasks.models import Task, TaskStatus

tasks: Table = Task.__table__  # type: ignore[attr-defined]
c = tasks.c
_processing = c.status == TaskStatus.PROCESSING.value


async def upstream_jobs(conn: AsyncConnection, task_ids: list[str]) -> list[tuple[str, str, str]]:
    """(task id, channel id, upstream job id) of those tasks that have a job upstream."""
    if not task_ids:
        return []
    stmt = select(c.id, c.channel_id, c.upstream_job_id).where(
        c.id.in_(task_ids), c.channel_id.is_not(None), c.upstream_job_id.is_not(None)
    )
    return [(row[0], row[1], row[2]) for row in await conn.execute(stmt)]


async def stale_pending(
    conn: AsyncConnection, older_than: float, limit: int, offset: int = 0
) -> list[tuple[str, int]]:
    """Tasks old enough that their job may have been lost with Redis: pending ones, and
    processing ones handed to a new attempt (lease cleared) whose enqueue never happened.
    Oldest first; ``offset`` pages past tasks the caller found accounted for."""
    waiting = (c.status == TaskStatus.PENDING.value) | (_processing & c.lease_expires_at.is_(None))
    stmt = (
        select(c.id, c.attempt)
        .where(waiting, c.created_at < func.now() - timedelta(seconds=older_than))
        .order_by(c.created_at, c.id)
        .offset(offset)
        .limit(limit)
    )
    return [(row[0], row[1]) for row in await conn.execute(stmt)]


async def holding_slots(conn: AsyncConnection) -> list[tuple[str, int, str]]:
    """Running tasks whose run holds a slot on a channel: (task, attempt, channel)."""
    stmt = select(c.id, c.attempt, c.channel_id).where(
        _processing, c.channel_id.is_not(None), c.lease_expires_at > func.now()
    )
    return [(row[0], row[1], row[2]) for row in await conn.execute(stmt)]
