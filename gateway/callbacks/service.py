"""Deliveries and attempts in PostgreSQL; signing. The HTTP call is the worker's.

An attempt is claimed before it is made (``claim_attempt``: a conditional
UPDATE), so two deliveries of the same job cannot both send it; the claim also
moves ``next_attempt_at`` past the attempt's timeout and its retry gap, so if
the worker dies mid-attempt the reconciler still queues the next one.

A callback's body (``callback_body``) is the task as the front door it came
through shows it: the unified task object, or the Krea job object.

A task's end records its delivery in the database, in the same call as its
settlement (``tollgate_settle``, migration 0014), and returns its id. Once the
end has committed, the worker queues that id's first attempt; the reconciler
(after failing overdue tasks) and the gateway (after a cancel) find theirs
with ``queue_first_attempts``.
"""

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from arq.connections import ArqRedis
from sqlalchemy import Table, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway import metrics
from gateway.callbacks.models import CallbackAttempt, CallbackDelivery, DeliveryStatus
from gateway.errors import Conflict
from gateway.krea.schemas import API as KREA_API
from gateway.krea.schemas import render_krea_job
from gateway.ledger.service import Db, connection
from gateway.queue import enqueue_callback
from gateway.storage import UrlSigner
from gateway.tasks.models import FINAL_STATES, Task
from gateway.tasks.schemas import encode_json
from gateway.tasks.service import get_tenant_task, render_task
from gateway.tenants.service import get_tenant

deliveries: Table = CallbackDelivery.__table__  # type: ignore[attr-defined]
attempts: Table = CallbackAttempt.__table__  # type: ignore[attr-defined]

# Seconds to wait after the n-th failed attempt; the length is the number of retries.
SCHEDULES: dict[str, tuple[int, ...]] = {
    "standard": (1, 2, 4),
    "extended": (1, 2, 4, *([3600] * 24)),  # then hourly for a day
}


def callback_body(task: Task, signer: UrlSigner) -> bytes:
    """A Krea-door task as ``GET /jobs/{id}`` shows it; any other as ``GET /v1/tasks/{id}``."""
    if task.api == KREA_API:
        return encode_json(render_krea_job(task, signer))
    return encode_json(render_task(task, signer))


def new_delivery_id() -> str:
    return "msg_" + secrets.token_hex(12)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value for these exact bytes."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


async def create_delivery(db: Db, task_id: str, tenant_id: str, url: str) -> str:
    """A new pending delivery of the task's final state, on the tenant's schedule."""
    delivery_id = new_delivery_id()
    await (await connection(db)).execute(
        text(
            "INSERT INTO callback_deliveries "
            "(id, task_id, tenant_id, url, status, schedule, attempts, next_attempt_at, "
            "created_at) SELECT :id, :task, :tenant, :url, 'pending', callback_schedule, 0, "
            "now(), now() FROM tenants WHERE id = :owner"
        ),
        # Two names for one value: asyncpg types each parameter from a single use.
        {"id": delivery_id, "task": task_id, "tenant": tenant_id, "owner": tenant_id, "url": url},
    )
    return delivery_id


async def redeliver(session: AsyncSession, tenant_id: str, task_id: str) -> str:
    """A new delivery of the tenant's finished task's callback; queue it after the commit."""
    task = await get_tenant_task(session, tenant_id, task_id)
    if task.callback_url is None:
        raise Conflict("This task has no callback_url to deliver to")
    if task.status not in FINAL_STATES:
        raise Conflict("This task has not finished; its callback is sent when it does")
    return await create_delivery(session, task.id, tenant_id, task.callback_url)


async def set_schedule(session: AsyncSession, tenant_id: str, schedule: str) -> None:
    """Put the tenant's future deliveries on ``schedule`` (a key of ``SCHEDULES``)."""
    tenant = await get_tenant(session, tenant_id)
    tenant.callback_schedule = schedule
    session.add(tenant)


async def pending_for_task(conn: AsyncConnection, task_id: str) -> list[str]:
    """Deliveries of a task not yet attempted (to queue right after the task ends)."""
    rows = await conn.execute(
        select(deliveries.c.id).where(
            deliveries.c.task_id == task_id,
            deliveries.c.status == DeliveryStatus.PENDING.value,
            deliveries.c.attempts == 0,
        )
    )
    return [row[0] for row in rows]


async def queue_first_attempts(
    redis: ArqRedis, queue_name: str, engine: AsyncEngine, task_id: str
) -> None:
    """Queue the first attempt of the deliveries a task's end created, once it committed."""
    async with engine.connect() as conn:
        pending = await pending_for_task(conn, task_id)
    for delivery_id in pending:
        await enqueue_callback(redis, queue_name, delivery_id, 1)


@dataclass(frozen=True, slots=True)
class Claimed:
    url: str
    task_id: str
    tenant_id: str
    number: int
    retries_left: int
    gap_seconds: int  # wait before the next attempt, if this one fails


def _by_schedule(name: str) -> str:
    """A SQL CASE on the delivery's schedule: the bind ``name_<schedule>`` (else standard's)."""
    whens = " ".join(
        f"WHEN '{schedule}' THEN CAST(:{name}_{schedule} AS integer)"
        for schedule in SCHEDULES
        if schedule != "standard"
    )
    return f"(CASE schedule {whens} ELSE CAST(:{name}_standard AS integer) END)"


# The claim in one statement: due, pending, not past its schedule's last attempt.
_CLAIM = text(
    "UPDATE callback_deliveries SET attempts = :number, next_attempt_at = now() + "
    f"make_interval(secs => CAST(:base AS double precision) + {_by_schedule('gap')}) "
    "WHERE id = :id AND status = 'pending' AND attempts = :previous "
    f"AND CAST(:number_again AS integer) <= {_by_schedule('last')} "
    "RETURNING url, task_id, tenant_id, schedule"
)


async def claim_attempt(
    conn: AsyncConnection, delivery_id: str, number: int, timeout_seconds: float
) -> Claimed | None:
    """Take attempt ``number`` of a pending delivery; None if it is not due to this job.

    One statement when the attempt is due (the usual case); otherwise the slow
    path below finds out why, and gives up a delivery whose last attempt was
    claimed by a worker that died.
    """
    params: dict[str, Any] = {
        "id": delivery_id,
        "number": number,
        "number_again": number,
        "previous": number - 1,
        # If this worker dies mid-attempt, the reconciler finds the delivery due again.
        "base": float(timeout_seconds + 5),
    }
    for name, gaps in SCHEDULES.items():
        params[f"gap_{name}"] = gaps[number - 1] if number <= len(gaps) else 0
        params[f"last_{name}"] = len(gaps) + 1
    claimed = (await conn.execute(_CLAIM, params)).first()
    if claimed is not None:
        schedule = SCHEDULES.get(claimed[3], SCHEDULES["standard"])
        return Claimed(
            url=claimed[0],
            task_id=claimed[1],
            tenant_id=claimed[2],
            number=number,
            retries_left=max(0, len(schedule) - (number - 1)),
            gap_seconds=schedule[number - 1] if number <= len(schedule) else 0,
        )
    return await _claim_slowly(conn, delivery_id, number, timeout_seconds)


async def _claim_slowly(
    conn: AsyncConnection, delivery_id: str, number: int, timeout_seconds: float
) -> Claimed | None:
    row = (
        await conn.execute(
            select(deliveries.c.schedule).where(
                deliveries.c.id == delivery_id,
                deliveries.c.status == DeliveryStatus.PENDING.value,
                deliveries.c.attempts == number - 1,
            )
        )
    ).first()
    if row is None:
        return None
    schedule = SCHEDULES.get(row[0], SCHEDULES["standard"])
    if number > len(schedule) + 1:
        # The last attempt was claimed but its worker died before recording it.
        await give_up_exhausted(conn, delivery_id)
        return None
    gap = schedule[number - 1] if number <= len(schedule) else 0
    # If this worker dies mid-attempt, the reconciler finds the delivery due again.
    due = timedelta(seconds=timeout_seconds + gap + 5)
    claimed = (
        await conn.execute(
            update(deliveries)
            .where(
                deliveries.c.id == delivery_id,
                deliveries.c.status == DeliveryStatus.PENDING.value,
                deliveries.c.attempts == number - 1,
            )
            .values(attempts=number, next_attempt_at=func.now() + due)
            .returning(deliveries.c.url, deliveries.c.task_id, deliveries.c.tenant_id)
        )
    ).first()
    if claimed is None:
        return None
    return Claimed(
        url=claimed[0],
        task_id=claimed[1],
        tenant_id=claimed[2],
        number=number,
        retries_left=max(0, len(schedule) - (number - 1)),
        gap_seconds=gap,
    )


async def record_attempt(
    conn: AsyncConnection,
    delivery_id: str,
    claimed: Claimed,
    *,
    started_at: Any,
    duration_ms: int,
    status_code: int | None,
    error: str | None,
) -> str:
    """Store the attempt and the delivery's new state: delivered, failed (given up) or pending."""
    succeeded = status_code is not None and 200 <= status_code < 300
    attempt = insert(attempts).values(
        delivery_id=delivery_id,
        number=claimed.number,
        started_at=started_at,
        duration_ms=duration_ms,
        status_code=status_code,
        error=(error or None) and error[:500],
        succeeded=succeeded,
    )
    if succeeded:
        state, next_at = DeliveryStatus.DELIVERED.value, None
    elif claimed.retries_left == 0:
        state, next_at = DeliveryStatus.FAILED.value, None
    else:
        state = DeliveryStatus.PENDING.value
        next_at = func.now() + timedelta(seconds=claimed.gap_seconds)
    finished = func.now() if state != DeliveryStatus.PENDING.value else None
    # One statement: the attempt's row (a CTE) and the delivery's new state, atomically.
    await conn.execute(
        update(deliveries)
        .where(deliveries.c.id == delivery_id)
        .values(status=state, next_attempt_at=next_at, finished_at=finished)
        .add_cte(attempt.cte("attempt"))
    )
    return state


async def due_deliveries(conn: AsyncConnection, limit: int) -> list[tuple[str, int]]:
    """Pending deliveries whose next attempt is overdue: (id, attempt number to run)."""
    rows = await conn.execute(
        select(deliveries.c.id, deliveries.c.attempts)
        .where(
            deliveries.c.status == DeliveryStatus.PENDING.value,
            deliveries.c.next_attempt_at < func.now(),
        )
        .order_by(deliveries.c.next_attempt_at)
        .limit(limit)
    )
    return [(row[0], row[1] + 1) for row in rows]


async def give_up_exhausted(conn: AsyncConnection, delivery_id: str) -> None:
    """A delivery whose last attempt was claimed but never recorded (its worker died)."""
    result = await conn.execute(
        update(deliveries)
        .where(deliveries.c.id == delivery_id, deliveries.c.status == DeliveryStatus.PENDING.value)
        .values(status=DeliveryStatus.FAILED.value, finished_at=func.now(), next_attempt_at=None)
    )
    if result.rowcount == 1:
        metrics.callback_given_up(conn)


async def list_deliveries(db: Db, task_id: str) -> list[dict[str, Any]]:
    conn = await connection(db)
    found = list(
        await conn.execute(
            select(deliveries)
            .where(deliveries.c.task_id == task_id)
            .order_by(deliveries.c.created_at)
        )
    )
    tried = await conn.execute(
        select(attempts)
        .where(attempts.c.delivery_id.in_([d.id for d in found]))
        .order_by(attempts.c.delivery_id, attempts.c.number)
    )
    by_delivery: dict[str, list[dict[str, Any]]] = {}
    for a in tried:
        by_delivery.setdefault(a.delivery_id, []).append(
            {
                "number": a.number,
                "at": a.started_at.isoformat(),
                "duration_ms": a.duration_ms,
                "status_code": a.status_code,
                "error": a.error,
                "succeeded": a.succeeded,
            }
        )
    return [
        {
            "id": d.id,
            "url": d.url,
            "status": d.status,
            "schedule": d.schedule,
            "attempts": by_delivery.get(d.id, []),
            "next_attempt_at": d.next_attempt_at.isoformat() if d.next_attempt_at else None,
            "created_at": d.created_at.isoformat(),
            "finished_at": d.finished_at.isoformat() if d.finished_at else None,
        }
        for d in found
    ]
