"""Task state transitions, each one conditional UPDATE.

Rules:
- Every write names the ``attempt`` it belongs to. The reconciler bumps
  ``attempt`` when a worker's lease runs out and queues the task again; from
  then on the old worker's writes match no row, so at most one worker's
  outcome is ever recorded, however many ran the job.
- Final states (completed, failed, cancelled) are never left: every UPDATE
  requires an open status.
- Times come from PostgreSQL's ``now()``, one clock for every process.
- A task's hold is settled in the same transaction as the transition that
  makes the task final: captured on completion (by the quote it was reserved
  with), released on failure. Either both happen or neither. The same
  transaction frees the tenant's in-flight slot and returns unused budget.
- Every change a client can see (claimed, progress, cancellable, every end)
  signals the task's waiters once its transaction commits
  (``gateway/tasks/events.py``); a rolled-back change signals nothing.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Table, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import metrics
from gateway.callbacks import service as callbacks
from gateway.ledger import service as ledger
from gateway.limits import service as limits
from gateway.tasks import events
from gateway.tasks.models import OPEN_STATES, Task, TaskStatus
from pricing.quote import UpstreamCost, settlement, upstream_cost

tasks: Table = Task.__table__  # type: ignore[attr-defined]
c = tasks.c
_open = c.status.in_(OPEN_STATES)
_processing = c.status == TaskStatus.PROCESSING.value

logger = logging.getLogger("tollgate.tasks")


def _fence(task_id: str, attempt: int) -> ColumnElement[bool]:
    return (c.id == task_id) & (c.attempt == attempt)


def _changed(result: Any) -> bool:
    return bool(result.rowcount == 1)


async def _finish(conn: AsyncConnection, task_id: str, row: Any, charge: int | None) -> None:
    """What every end of a task does, in its transaction: settle the hold (capture
    ``charge``, or release when None), free the in-flight slot, give the key's
    budgets back what was reserved but not charged, and record the callback."""
    if charge is None:
        await ledger.release(conn, row.tenant_id, task_id, row.credits_reserved_micros)
    else:
        await ledger.capture(conn, row.tenant_id, task_id, row.credits_reserved_micros, charge)
    await limits.free_in_flight_slot(conn, row.tenant_id)
    unused = row.credits_reserved_micros - (charge or 0)
    await limits.return_spend(conn, row.api_key_id, row.created_at, unused)
    if row.callback_url:
        # After the settlement above, in the same transaction: the callback can
        # neither be lost nor report a charge that did not happen.
        await callbacks.create_delivery(conn, task_id, row.tenant_id, row.callback_url)
    await _record_end(conn, task_id, row, charge)
    events.task_changed(conn, task_id)


# Returned by every ending UPDATE: what _finish settles with, and what _record_end
# counts and logs.
_ENDING = (
    c.tenant_id,
    c.credits_reserved_micros,
    c.api_key_id,
    c.created_at,
    c.callback_url,
    c.model,
    c.status,
    c.request_id,
)


async def _record_end(conn: AsyncConnection, task_id: str, row: Any, charge: int | None) -> None:
    """Count the end and log it, once (and only if) its transaction commits.

    Every ending UPDATE returns ``_ENDING`` with its row.
    """
    model, status, request_id = row.model, row.status, row.request_id

    def record() -> None:
        metrics.task_finished(model, status)
        logger.info(
            "task %s %s",
            task_id,
            status,
            extra={
                "task_id": task_id,
                "request_id": request_id,
                "model": model,
                "status": status,
                "charged_micros": charge or 0,
            },
        )

    metrics.after_commit(conn, record)


@dataclass(frozen=True, slots=True)
class Claimed:
    model: str
    provider: str
    request: dict[str, Any]
    upstream_job_id: str | None
    channel_id: str | None
    created_at: datetime
    callback_url: str | None
    request_id: str | None
    quote: dict[str, Any]


async def claim(conn: AsyncConnection, task_id: str, attempt: int, lease: float) -> Claimed | None:
    """Mark the task processing under a lease; None if this run may not work on it."""
    # Exclusive: a second delivery of the same attempt finds a live lease and stays out.
    free = (c.lease_expires_at.is_(None)) | (c.lease_expires_at < func.now())
    stmt = (
        update(tasks)
        .where(_fence(task_id, attempt), _open, free)
        .values(
            status=TaskStatus.PROCESSING.value,
            started_at=func.coalesce(c.started_at, func.now()),
            lease_expires_at=func.now() + timedelta(seconds=lease),
            progress=func.greatest(c.progress, 5),
        )
        .returning(
            c.model,
            c.provider,
            c.request,
            c.upstream_job_id,
            c.channel_id,
            c.created_at,
            c.callback_url,
            c.request_id,
            c.quote,
        )
    )
    row = (await conn.execute(stmt)).first()
    if row is None:
        return None
    events.task_changed(conn, task_id)
    return Claimed(*row)


async def heartbeat(
    conn: AsyncConnection,
    task_id: str,
    attempt: int,
    lease: float,
    *,
    progress: int | None = None,
    upstream_job_id: str | None = None,
) -> bool:
    """Renew the lease (and record progress); False once this attempt has lost the task."""
    values: dict[str, Any] = {"lease_expires_at": func.now() + timedelta(seconds=lease)}
    if progress is not None:
        values["progress"] = func.greatest(c.progress, min(progress, 99))
    if upstream_job_id is not None:
        values["upstream_job_id"] = upstream_job_id
    stmt = update(tasks).where(_fence(task_id, attempt), _processing).values(**values)
    changed = _changed(await conn.execute(stmt))
    if changed and progress is not None:
        events.task_changed(conn, task_id)
    return changed


async def record_route(
    conn: AsyncConnection,
    task_id: str,
    attempt: int,
    lease: float,
    *,
    channel_id: str,
    upstream_job_id: str | None,
    can_cancel: bool,
) -> bool:
    """Record the channel the task runs on and its upstream job there (None: not yet,
    or given up after a failover), renewing the lease; False once this attempt lost it."""
    stmt = (
        update(tasks)
        .where(_fence(task_id, attempt), _processing)
        .values(
            channel_id=channel_id,
            upstream_job_id=upstream_job_id,
            can_cancel=can_cancel,
            lease_expires_at=func.now() + timedelta(seconds=lease),
        )
    )
    changed = _changed(await conn.execute(stmt))
    if changed:
        events.task_changed(conn, task_id)  # task_info.can_cancel may have changed
    return changed


async def hand_back(conn: AsyncConnection, task_id: str, attempt: int) -> bool:
    """A worker shutting down gives its task back: the lease ends now, so the same job,
    run again by another worker, claims it at once and resumes its upstream job."""
    stmt = (
        update(tasks)
        .where(_fence(task_id, attempt), _processing)
        .values(lease_expires_at=func.now())
    )
    return _changed(await conn.execute(stmt))


@dataclass(frozen=True, slots=True)
class Cancelled:
    """A task cancelled by its tenant, and the upstream job to cancel, if one runs."""

    channel_id: str | None
    upstream_job_id: str | None
    callback_url: str | None


async def cancel(conn: AsyncConnection, task_id: str, tenant_id: str) -> Cancelled | None:
    """Cancel the tenant's task while it may be cancelled; release its whole hold.

    A pending task may always be cancelled; a processing one while
    ``can_cancel`` (its upstream can cancel the job). Bumping ``attempt``
    fences out the worker on it: its next write matches nothing and it stops.
    None if the task is not the tenant's, is final, or cannot be cancelled now.
    """
    cancellable = (c.status == TaskStatus.PENDING.value) | (_processing & c.can_cancel)
    stmt = (
        update(tasks)
        .where(c.id == task_id, c.tenant_id == tenant_id, cancellable)
        .values(
            status=TaskStatus.CANCELLED.value,
            attempt=c.attempt + 1,
            error_code="cancelled",
            error_message="The task was cancelled at the tenant's request",
            finished_at=func.now(),
            lease_expires_at=None,
            credits_charged_micros=0,
            upstream_cost_micros=0,
            can_cancel=False,
        )
        .returning(
            *_ENDING,
            c.channel_id,
            c.upstream_job_id,
        )
    )
    row = (await conn.execute(stmt)).first()
    if row is None:
        return None
    await _finish(conn, task_id, row, None)
    return Cancelled(row.channel_id, row.upstream_job_id, row.callback_url)


async def complete(
    conn: AsyncConnection,
    task_id: str,
    attempt: int,
    results: list[str],
    ttl_seconds: int,
    sizes: list[tuple[int, int]] | None = None,
    cost: UpstreamCost | None = None,
    channel_id: str | None = None,
) -> bool:
    """Record the results (and each one's width and height) and capture the charge;
    False if this attempt lost the task.

    ``cost`` is the upstream cost of the channel that made the results (``channel_id``);
    without it, the quote's catalogue cost. The charge is always the held quote's.
    """
    stmt = (
        update(tasks)
        .where(_fence(task_id, attempt), _processing)
        .values(
            status=TaskStatus.COMPLETED.value,
            progress=100,
            results=results,
            result_sizes=None if sizes is None else [list(size) for size in sizes],
            images_delivered=len(results),
            finished_at=func.now(),
            results_expire_at=func.now() + timedelta(seconds=ttl_seconds),
            lease_expires_at=None,
        )
        .returning(
            *_ENDING,
            c.quote,
        )
    )
    row = (await conn.execute(stmt)).first()
    if row is None:
        return False
    charge, quoted_cost = settlement(row.quote, len(results))
    await _finish(conn, task_id, row, charge)
    figures: dict[str, Any] = {"credits_charged_micros": charge}
    if cost is None:
        figures["upstream_cost_micros"] = quoted_cost
        if row.quote.get("exact_cost_native") is not None:
            cost = upstream_cost(row.quote, len(results))
    if cost is not None:
        figures.update(
            upstream_cost_micros=cost.micros,
            upstream_cost_amount=str(cost.amount),
            upstream_cost_currency=cost.currency,
        )
    if channel_id is not None:
        figures["channel_id"] = channel_id
    await conn.execute(update(tasks).where(c.id == task_id).values(**figures))
    return True


async def fail(conn: AsyncConnection, task_id: str, attempt: int, code: str, message: str) -> bool:
    """Fail the task and release its whole hold; False if this attempt lost the task."""
    stmt = (
        update(tasks)
        .where(_fence(task_id, attempt), _open)
        .values(
            status=TaskStatus.FAILED.value,
            error_code=code,
            error_message=message[:1000],
            finished_at=func.now(),
            lease_expires_at=None,
            credits_charged_micros=0,
            upstream_cost_micros=0,
        )
        .returning(
            *_ENDING,
        )
    )
    row = (await conn.execute(stmt)).first()
    if row is None:
        return False
    await _finish(conn, task_id, row, None)
    return True


async def reclaim_expired_leases(conn: AsyncConnection, limit: int) -> list[tuple[str, int]]:
    """Hand tasks whose worker went silent to a new attempt; returns (id, new attempt)."""
    expired = (
        select(c.id)
        .where(
            _processing,
            c.lease_expires_at < func.now(),
        )
        .order_by(c.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(tasks)
        .where(c.id.in_(expired))
        .values(attempt=c.attempt + 1, lease_expires_at=None)
        .returning(c.id, c.attempt)
    )
    return [(row[0], row[1]) for row in await conn.execute(stmt)]


async def restart_unclaimed(conn: AsyncConnection, task_id: str, attempt: int) -> int | None:
    """Give a task that no worker holds a new attempt; returns it, or None if the task moved.

    For a task whose job arq handed to a worker that died before its first write: that
    job id is stuck (arq keeps it "in progress" for up to its longest job timeout), so
    only a new attempt, with a new job id, runs it again. Fenced by ``attempt`` and
    limited to tasks no lease holds, so a worker that did claim it keeps it.
    """
    unclaimed = (c.status == TaskStatus.PENDING.value) | (
        _processing & c.lease_expires_at.is_(None)
    )
    stmt = (
        update(tasks)
        .where(_fence(task_id, attempt), unclaimed)
        .values(attempt=c.attempt + 1, lease_expires_at=None)
        .returning(c.attempt)
    )
    row = (await conn.execute(stmt)).first()
    return None if row is None else int(row[0])


async def fail_overdue(conn: AsyncConnection, deadline_seconds: int, limit: int) -> list[str]:
    """Fail open tasks past their deadline and release their holds (the sweeper).

    Bumping ``attempt`` fences out any worker still on the task.
    """
    overdue = (
        select(c.id)
        .where(_open, c.created_at < func.now() - timedelta(seconds=deadline_seconds))
        .order_by(c.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(tasks)
        .where(c.id.in_(overdue))
        .values(
            status=TaskStatus.FAILED.value,
            attempt=c.attempt + 1,
            error_code="timeout",
            error_message=f"The generation did not finish within {deadline_seconds} seconds",
            finished_at=func.now(),
            lease_expires_at=None,
            credits_charged_micros=0,
            upstream_cost_micros=0,
        )
        .returning(
            c.id,
            *_ENDING,
        )
    )
    failed = list(await conn.execute(stmt))
    for row in failed:
        await _finish(conn, row.id, row, None)
    return [row.id for row in failed]
