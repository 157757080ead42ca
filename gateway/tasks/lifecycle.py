"""Task state transitions, each one conditional UPDATE.

Rules:
- Every write names the ``attempt`` it belongs to. The reconciler bumps
  ``attempt`` when a worker's lease runs out and queues the task again; from
  then on the old worker's writes match no row, so at most one worker's
  outcome is ever recorded, however many ran the job.
- Final states (completed, failed, cancelled) are never left: every UPDATE
  requires an open status.
- Times come from PostgreSQL's ``now()``, one clock for every process.
- Every end (complete, fail, cancel, the sweeper's timeout) is one call of a
  database function (migration 0014, ADR 0006): the ending UPDATE and, in its
  transaction, the task's one settlement (``tollgate_settle``): its hold
  captured on completion (by the quote it was reserved with) or released, the
  tenant's in-flight slot freed, unused budget returned to the key, and the
  callback delivery recorded. Either all of it happens or none.
- A write takes ``Db``: a ``Statements`` (the worker: each statement is its own
  transaction, one round trip) or an ``AsyncConnection`` whose transaction the
  statement joins (the gateway's cancel, the sweeper, tests).
- Every change a client can see (claimed, progress, cancellable, every end)
  signals the task's waiters once its transaction commits
  (``gateway/tasks/events.py``); a rolled-back change signals nothing. An end is
  counted and logged the same way, once.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import metrics
from gateway.db import Statements
from gateway.tasks import events
from gateway.tasks.models import OPEN_STATES, Task, TaskStatus
from pricing.quote import UpstreamCost, settlement, upstream_cost

tasks: Table = Task.__table__  # type: ignore[attr-defined]
c = tasks.c
_open = c.status.in_(OPEN_STATES)
_processing = c.status == TaskStatus.PROCESSING.value

logger = logging.getLogger("tollgate.tasks")

Db = Statements | AsyncConnection


def _fence(task_id: str, attempt: int) -> ColumnElement[bool]:
    return (c.id == task_id) & (c.attempt == attempt)


async def _fetch(db: Db, sql: str, *args: Any) -> list[Any]:
    """Run one statement (numbered parameters) on ``db``; its rows."""
    if isinstance(db, AsyncConnection):
        return list(await db.exec_driver_sql(sql, args))
    return await db.fetch(sql, *args)


def _signal(db: Db, task_id: str) -> None:
    """Signal the task's waiters once the change is committed."""
    if isinstance(db, AsyncConnection):
        events.task_changed(db, task_id)
    else:
        events.committed(db.engine, task_id)


def _after_commit(db: Db, record: Callable[[], None]) -> None:
    if isinstance(db, AsyncConnection):
        metrics.after_commit(db, record)
    else:
        record()


# A lease ``$n`` seconds from now.
def _lease(n: int) -> str:
    return f"now() + make_interval(secs => ${n})"


def _progress(n: int) -> str:
    """Progress ``$n`` (NULL: none given) only ever rises, and stays below 100 until the
    end. The coalesce matters: ``least`` skips NULLs, so without it none would mean 99."""
    return f"progress = greatest(progress, least(coalesce(${n}::integer, 0), 99))"


_PROCESSING = f"status = '{TaskStatus.PROCESSING.value}'"
_FENCE = "id = $1 AND attempt = $2"


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


# Exclusive: a second delivery of the same attempt finds a live lease and stays out. With
# a channel ($4), it records it (and whether the job there can be cancelled, $5) as
# ``record_route`` would before a submit, unless an upstream job already runs somewhere:
# that job's channel stays, and is what the claim returns.
_CLAIM = (
    f"UPDATE tasks SET status = '{TaskStatus.PROCESSING.value}', "
    f"started_at = coalesce(started_at, now()), lease_expires_at = {_lease(3)}, "
    "progress = greatest(progress, 5), "
    "channel_id = CASE WHEN upstream_job_id IS NULL AND $4::text IS NOT NULL THEN $4 "
    "ELSE channel_id END, "
    "can_cancel = CASE WHEN upstream_job_id IS NULL AND $4::text IS NOT NULL THEN $5 "
    f"ELSE can_cancel END WHERE {_FENCE} "
    f"AND status IN ({', '.join(repr(state) for state in OPEN_STATES)}) "
    "AND (lease_expires_at IS NULL OR lease_expires_at < now()) "
    "RETURNING model, provider, request, upstream_job_id, channel_id, created_at, "
    "callback_url, request_id, quote"
)


async def claim(
    db: Db,
    task_id: str,
    attempt: int,
    lease: float,
    *,
    channel_id: str | None = None,
    can_cancel: bool = False,
) -> Claimed | None:
    """Mark the task processing under a lease; None if this run may not work on it.

    ``channel_id``: the channel the run holds a slot on, recorded with ``can_cancel`` in the
    same statement when no upstream job runs yet (the first ``record_route`` a submit
    needs: one round trip fewer)."""
    rows = await _fetch(db, _CLAIM, task_id, attempt, float(lease), channel_id, can_cancel)
    if not rows:
        return None
    _signal(db, task_id)
    return Claimed(*rows[0])


_BEAT = (
    f"UPDATE tasks SET lease_expires_at = {_lease(3)}, {_progress(4)}, "
    f"upstream_job_id = coalesce($5, upstream_job_id) WHERE {_FENCE} AND {_PROCESSING} "
    "RETURNING 1"
)


async def heartbeat(
    db: Db,
    task_id: str,
    attempt: int,
    lease: float,
    *,
    progress: int | None = None,
    upstream_job_id: str | None = None,
) -> bool:
    """Renew the lease (and record progress); False once this attempt has lost the task."""
    changed = bool(
        await _fetch(db, _BEAT, task_id, attempt, float(lease), progress, upstream_job_id)
    )
    if changed and progress is not None:
        _signal(db, task_id)
    return changed


_ROUTE = (
    "UPDATE tasks SET channel_id = $4, upstream_job_id = $5, can_cancel = $6, "
    f"lease_expires_at = {_lease(3)}, {_progress(7)} "
    f"WHERE {_FENCE} AND {_PROCESSING} RETURNING 1"
)


async def record_route(
    db: Db,
    task_id: str,
    attempt: int,
    lease: float,
    *,
    channel_id: str,
    upstream_job_id: str | None,
    can_cancel: bool,
    progress: int | None = None,
) -> bool:
    """Record the channel the task runs on and its upstream job there (None: not yet,
    or given up after a failover), renewing the lease and recording ``progress`` if
    given; False once this attempt lost it."""
    args = (channel_id, upstream_job_id, can_cancel, progress)
    changed = bool(await _fetch(db, _ROUTE, task_id, attempt, float(lease), *args))
    if changed:
        _signal(db, task_id)  # task_info.can_cancel may have changed
    return changed


_HAND_BACK = (
    f"UPDATE tasks SET lease_expires_at = now() WHERE {_FENCE} AND {_PROCESSING} RETURNING 1"
)


async def hand_back(db: Db, task_id: str, attempt: int) -> bool:
    """A worker shutting down gives its task back: the lease ends now, so the same job,
    run again by another worker, claims it at once and resumes its upstream job."""
    return bool(await _fetch(db, _HAND_BACK, task_id, attempt))


_HAND_ON_DEAD = (
    "UPDATE tasks SET lease_expires_at = CASE WHEN upstream_job_id IS NOT NULL "
    f"THEN now() ELSE lease_expires_at END WHERE {_FENCE} AND {_PROCESSING} "
    "RETURNING channel_id, upstream_job_id IS NOT NULL"
)


async def hand_on_dead(db: Db, task_id: str, attempt: int) -> tuple[str | None, bool] | None:
    """A run whose worker died: end its lease if its upstream job id is recorded (the next
    attempt resumes that job). Returns (the channel it worked on, whether it was handed
    on), or None if the task is elsewhere; a run that may be mid-submit keeps its lease,
    which then runs out by itself."""
    rows = await _fetch(db, _HAND_ON_DEAD, task_id, attempt)
    if not rows:
        return None
    channel_id, handed = rows[0]
    return (None if channel_id is None else str(channel_id)), bool(handed)


# --- Ends: one database call each (migration 0014) ----------------------------------


@dataclass(frozen=True, slots=True)
class Ended:
    """A task an ending call ended, and settled."""

    task_id: str
    tenant_id: str
    status: str
    model: str
    request_id: str | None
    callback_url: str | None
    channel_id: str | None
    upstream_job_id: str | None
    hold_micros: int
    charged_micros: int
    settled: bool  # False: the hold was already settled (never, while ends are fenced)
    delivery_id: str | None  # the callback delivery of this end, to queue after the commit


def _ending(function: str, params: int) -> str:
    columns = ", ".join(Ended.__dataclass_fields__)
    numbered = ", ".join(f"${n}" for n in range(1, params + 1))
    return f"SELECT {columns} FROM {function}({numbered})"


_COMPLETE = _ending("tollgate_complete", 10)
_FAIL = _ending("tollgate_fail", 4)
_CANCEL = _ending("tollgate_cancel", 4)
_FAIL_OVERDUE = _ending("tollgate_fail_overdue", 4)


def _ended(db: Db, row: Any) -> Ended:
    """The row an ending call returned; counted, logged and signalled after the commit."""
    ended = Ended(*row)

    def record() -> None:
        if ended.settled:
            released = ended.hold_micros - ended.charged_micros
            metrics.credits_settled(ended.tenant_id, ended.charged_micros, released)
        metrics.task_finished(ended.model, ended.status)
        logger.info(
            "task %s %s",
            ended.task_id,
            ended.status,
            extra={
                "task_id": ended.task_id,
                "request_id": ended.request_id,
                "model": ended.model,
                "status": ended.status,
                "charged_micros": ended.charged_micros,
            },
        )

    _after_commit(db, record)
    _signal(db, ended.task_id)
    return ended


@dataclass(frozen=True, slots=True)
class Cancelled:
    """A task cancelled by its tenant, and the upstream job to cancel, if one runs."""

    channel_id: str | None
    upstream_job_id: str | None
    callback_url: str | None


async def cancel(db: Db, task_id: str, tenant_id: str) -> Cancelled | None:
    """Cancel the tenant's task while it may be cancelled; release its whole hold.

    A pending task may always be cancelled; a processing one while
    ``can_cancel`` (its upstream can cancel the job). Bumping ``attempt``
    fences out the worker on it: its next write matches nothing and it stops.
    None if the task is not the tenant's, is final, or cannot be cancelled now.
    """
    message = "The task was cancelled at the tenant's request"
    rows = await _fetch(db, _CANCEL, task_id, tenant_id, "cancelled", message)
    if not rows:
        return None
    ended = _ended(db, rows[0])
    return Cancelled(ended.channel_id, ended.upstream_job_id, ended.callback_url)


async def complete(
    db: Db,
    task_id: str,
    attempt: int,
    results: list[str],
    ttl_seconds: int,
    sizes: list[tuple[int, int]] | None = None,
    cost: UpstreamCost | None = None,
    channel_id: str | None = None,
    quote: dict[str, Any] | None = None,
) -> Ended | None:
    """Record the results (and each one's width and height) and capture the charge;
    None if this attempt lost the task.

    ``quote`` is the one the task was reserved with (the claim returns it; read here
    when not given): the charge is always the held quote's. ``cost`` is the upstream
    cost of the channel that made the results (``channel_id``); without it, the
    quote's catalogue cost.
    """
    if quote is None:
        found = await _fetch(db, "SELECT quote FROM tasks WHERE id = $1", task_id)
        if not found:
            return None
        quote = found[0][0]
    charge, quoted_cost = settlement(quote, len(results))
    if cost is None and quote.get("exact_cost_native") is not None:
        cost = upstream_cost(quote, len(results))
    rows = await _fetch(
        db,
        _COMPLETE,
        task_id,
        attempt,
        json.dumps(results),
        None if sizes is None else json.dumps([list(size) for size in sizes]),
        float(ttl_seconds),
        charge,
        quoted_cost if cost is None else cost.micros,
        None if cost is None else str(cost.amount),
        None if cost is None else cost.currency,
        channel_id,
    )
    return _ended(db, rows[0]) if rows else None


async def fail(db: Db, task_id: str, attempt: int, code: str, message: str) -> Ended | None:
    """Fail the task and release its whole hold; None if this attempt lost the task."""
    rows = await _fetch(db, _FAIL, task_id, attempt, code, message[:1000])
    return _ended(db, rows[0]) if rows else None


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


async def fail_overdue(db: Db, deadline_seconds: int, limit: int) -> list[str]:
    """Fail open tasks past their deadline and release their holds (the sweeper).

    Bumping ``attempt`` fences out any worker still on the task.
    """
    message = f"The generation did not finish within {deadline_seconds} seconds"
    rows = await _fetch(db, _FAIL_OVERDUE, float(deadline_seconds), limit, "timeout", message)
    return [_ended(db, row).task_id for row in rows]
