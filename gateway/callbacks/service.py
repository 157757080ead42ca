"""Deliveries and attempts in PostgreSQL; signing. The HTTP call is the worker's.

An attempt is claimed before it is made (``claim_attempts``: a conditional
UPDATE), so two deliveries of the same job cannot both send it; the claim also
moves ``next_attempt_at`` past the attempt's timeout and its retry gap, so if
the worker dies mid-attempt the reconciler still queues the next one. Claims
and outcomes come in batches (``claim_attempts``, ``record_attempts``): one
statement for the attempts the callback worker has in hand at once, the task
and the tenant's secret read by the claim itself.

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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from arq.connections import ArqRedis
from sqlalchemy import Table, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway import metrics
from gateway.callbacks.models import CallbackAttempt, CallbackDelivery, DeliveryStatus
from gateway.crypto import WEBHOOK_SECRET, open_sealed
from gateway.db import driver_of
from gateway.errors import Conflict
from gateway.krea.schemas import API as KREA_API
from gateway.krea.schemas import render_krea_job
from gateway.ledger.service import Db, connection
from gateway.queue import enqueue_callback
from gateway.storage import UrlSigner
from gateway.tasks.models import FINAL_STATES, Task
from gateway.tasks.schemas import encode_json
from gateway.tasks.service import TaskRecord, get_tenant_task, render_task
from gateway.tenants.models import Tenant
from gateway.tenants.service import get_tenant

deliveries: Table = CallbackDelivery.__table__  # type: ignore[attr-defined]
attempts: Table = CallbackAttempt.__table__  # type: ignore[attr-defined]

# Seconds to wait after the n-th failed attempt; the length is the number of retries.
SCHEDULES: dict[str, tuple[int, ...]] = {
    "standard": (1, 2, 4),
    "extended": (1, 2, 4, *([3600] * 24)),  # then hourly for a day
}


def callback_body(task: "Task | CallbackTask", signer: UrlSigner) -> bytes:
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


@dataclass(frozen=True, slots=True)
class CallbackTask(TaskRecord):
    """The task as its callback shows it: what the API reads, and (Krea's) when it ended."""

    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class Due:
    """A claimed attempt and what it sends: the task as it is now, the tenant's secret."""

    delivery_id: str
    claimed: Claimed
    task: CallbackTask
    request_id: str | None
    secret: str


def _gaps(alias: str) -> str:
    """The delivery's schedule's gaps as a SQL integer array (unknown names: standard's)."""

    def array(gaps: tuple[int, ...]) -> str:
        return "ARRAY[" + ", ".join(str(int(gap)) for gap in gaps) + "]::integer[]"

    whens = " ".join(
        f"WHEN '{name}' THEN {array(gaps)}"
        for name, gaps in SCHEDULES.items()
        if name != "standard"
    )
    return f"(CASE {alias}.schedule {whens} ELSE {array(SCHEDULES['standard'])} END)"


_TASK_COLUMNS = ", ".join(f"t.{name}" for name in CallbackTask.__dataclass_fields__)

# Many claims in one statement, each as ``_CLAIM`` makes it, with the task and the secret
# (sealed: opened here, gateway/crypto.py). Sent to the driver itself: SQLAlchemy's
# statement and result handling were a sixth of the callback worker's time.
_CLAIM_MANY = (
    "WITH wanted AS (SELECT * FROM unnest($1::text[], $2::integer[]) AS w(id, number)), "
    "claimed AS (UPDATE callback_deliveries d SET attempts = w.number, "
    "next_attempt_at = now() + make_interval(secs => $3::double precision "
    f"+ COALESCE({_gaps('d')}[w.number], 0)) FROM wanted w "
    "WHERE d.id = w.id AND d.status = 'pending' AND d.attempts = w.number - 1 "
    f"AND w.number <= cardinality({_gaps('d')}) + 1 "
    "RETURNING d.id, w.number, d.url, d.task_id, d.tenant_id, d.schedule) "
    f"SELECT c.id, c.number, c.url, c.schedule, n.webhook_secret, t.request_id, {_TASK_COLUMNS} "
    "FROM claimed c JOIN tasks t ON t.id = c.task_id AND t.tenant_id = c.tenant_id "
    "JOIN tenants n ON n.id = c.tenant_id"
)
# Stored sealed: the column's type opens what SQLAlchemy reads (gateway/crypto.py).
_SECRET = Tenant.__table__.c.webhook_secret.type  # type: ignore[attr-defined]


async def claim_attempts(
    conn: AsyncConnection, wanted: Sequence[tuple[str, int]], timeout_seconds: float
) -> list[Due | None]:
    """Claim attempt ``number`` of each delivery, with its task as it is now and the secret.

    An attempt is claimed if its delivery is pending, its previous attempt was the
    last claimed, and its schedule has that many attempts: one statement claims
    every such attempt (the usual case). The others go one by one through
    ``_claim_slowly``, which finds out why and gives up a delivery whose last
    attempt was claimed by a worker that died. None where an attempt is not due.
    ``conn`` is in autocommit: each statement is its own transaction.
    """
    driver = await driver_of(conn)
    rows = await driver.fetch(
        _CLAIM_MANY,
        [delivery_id for delivery_id, _ in wanted],
        [number for _, number in wanted],
        # If this worker dies mid-attempt, the reconciler finds the delivery due again.
        float(timeout_seconds + 5),
    )
    found: dict[tuple[str, int], Due] = {}
    for row in rows:
        delivery_id, number, url, schedule_name, sealed, request_id, *task = row
        secret = open_sealed(conn.dialect, WEBHOOK_SECRET, sealed) or ""
        record = CallbackTask(*task)
        schedule = SCHEDULES.get(schedule_name, SCHEDULES["standard"])
        claimed = Claimed(
            url=url,
            task_id=record.id,
            tenant_id=record.tenant_id,
            number=number,
            retries_left=max(0, len(schedule) - (number - 1)),
            gap_seconds=schedule[number - 1] if number <= len(schedule) else 0,
        )
        found[(delivery_id, number)] = Due(delivery_id, claimed, record, request_id, secret)
    answers: list[Due | None] = []
    for delivery_id, number in wanted:
        due = found.get((delivery_id, number))
        if due is None:
            slow = await _claim_slowly(conn, delivery_id, number, timeout_seconds)
            due = None if slow is None else await _due(conn, delivery_id, slow)
        answers.append(due)
    return answers


async def _due(conn: AsyncConnection, delivery_id: str, claimed: Claimed) -> Due | None:
    row = (
        await conn.execute(
            text(
                f"SELECT n.webhook_secret, t.request_id, {_TASK_COLUMNS} FROM tasks t "
                "JOIN tenants n ON n.id = t.tenant_id WHERE t.id = :task AND n.id = :tenant"
            ).columns(webhook_secret=_SECRET),
            {"task": claimed.task_id, "tenant": claimed.tenant_id},
        )
    ).first()
    if row is None:
        return None
    secret, request_id, *task = row
    return Due(delivery_id, claimed, CallbackTask(*task), request_id, secret)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt got: a status code, or the error that stood for one."""

    delivery_id: str
    claimed: Claimed
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None

    @property
    def state(self) -> str:
        """The delivery's state after this attempt: delivered, failed (given up) or pending."""
        if self.status_code is not None and 200 <= self.status_code < 300:
            return DeliveryStatus.DELIVERED.value
        if self.claimed.retries_left == 0:
            return DeliveryStatus.FAILED.value
        return DeliveryStatus.PENDING.value


# Many attempts' rows (a CTE) and their deliveries' new states, in one statement (to the
# driver itself, as ``_CLAIM_MANY``).
_RECORD_MANY = (
    "WITH outcome AS (SELECT * FROM unnest($1::text[], $2::integer[], $3::timestamptz[], "
    "$4::integer[], $5::integer[], $6::text[], $7::text[], $8::integer[]) "
    "AS o(id, number, started_at, duration_ms, status_code, error, state, gap)), "
    "attempt AS (INSERT INTO callback_attempts (delivery_id, number, started_at, "
    "duration_ms, status_code, error, succeeded) SELECT id, number, started_at, duration_ms, "
    "status_code, error, state = 'delivered' FROM outcome) "
    "UPDATE callback_deliveries d SET status = o.state, next_attempt_at = CASE "
    "WHEN o.state = 'pending' THEN now() + make_interval(secs => o.gap) END, "
    "finished_at = CASE WHEN o.state <> 'pending' THEN now() END "
    "FROM outcome o WHERE d.id = o.id"
)


async def record_attempts(conn: AsyncConnection, outcomes: Sequence[Outcome]) -> list[str]:
    """``record_attempt`` for many attempts in one statement; their deliveries' new states.
    ``conn`` is in autocommit."""
    states = [outcome.state for outcome in outcomes]
    driver = await driver_of(conn)
    await driver.execute(
        _RECORD_MANY,
        [o.delivery_id for o in outcomes],
        [o.claimed.number for o in outcomes],
        [o.started_at for o in outcomes],
        [o.duration_ms for o in outcomes],
        [o.status_code for o in outcomes],
        [(o.error or None) and o.error[:500] for o in outcomes],
        states,
        [o.claimed.gap_seconds for o in outcomes],
    )
    return states


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
