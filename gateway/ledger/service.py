"""Money moves. Each function writes one ledger row and the tenant's running totals.

A hold and its settlement are written by the database functions of the task's
submit and end (``tollgate_submit``, ``tollgate_settle``: migrations 0007 and 0014);
the key names they use are here.

Callers own the transaction; the functions take an ``AsyncSession`` or an
``AsyncConnection`` (both run Core statements) and never commit. See the
package docstring for the rules.
"""

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Table, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.errors import ApiError, Conflict, InvalidRequest, NotFound
from gateway.ledger.models import EntryKind, LedgerEntry
from gateway.ledger.schemas import CreditChange
from gateway.tasks.models import FINAL_STATES, Task
from gateway.tenants.models import Tenant
from gateway.tenants.service import get_tenant
from pricing.money import MoneyError, credits_from_micros, micros_from_signed_text

Db = AsyncSession | AsyncConnection

ledger: Table = LedgerEntry.__table__  # type: ignore[attr-defined]
tenants: Table = Tenant.__table__  # type: ignore[attr-defined]
tasks: Table = Task.__table__  # type: ignore[attr-defined]


class InsufficientQuota(ApiError):
    status = 402
    code = "insufficient_quota"
    type = "insufficient_quota"
    default_message = "Insufficient quota. Please top up your account."


def hold_key(task_id: str) -> str:
    return f"hold:{task_id}"


def settle_key(task_id: str) -> str:
    return f"settle:{task_id}"


async def connection(db: Db) -> AsyncConnection:
    """The connection under a session (same transaction): Core statements run on it."""
    return await db.connection() if isinstance(db, AsyncSession) else db


async def _exec(db: Db, stmt: Any) -> Any:
    return await (await connection(db)).execute(stmt)


async def _append(db: Db, **values: Any) -> bool:
    """Insert one ledger row; False when its idempotency key is already there."""
    stmt = (
        pg_insert(ledger)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(ledger.c.id)
    )
    return (await _exec(db, stmt)).first() is not None


async def _locked_tenant(db: Db, tenant_id: str) -> Any:
    row = (
        await _exec(
            db,
            select(tenants.c.balance_micros, tenants.c.held_micros)
            .where(tenants.c.id == tenant_id)
            .with_for_update(),
        )
    ).first()
    if row is None:
        raise NotFound(f"no tenant {tenant_id}")
    return row


async def credit(
    db: Db,
    tenant_id: str,
    amount: int,
    *,
    kind: EntryKind,
    idempotency_key: str,
    reason: str = "",
    task_id: str | None = None,
) -> bool:
    """Add (or, for an adjustment, subtract) credits. False if the key was used before."""
    if kind not in (EntryKind.TOPUP, EntryKind.ADJUSTMENT, EntryKind.REFUND):
        raise ValueError(f"{kind} is not a balance change")
    if len(reason) > 500 or "\x00" in reason:
        raise InvalidRequest("reason", "must be at most 500 characters")
    if not idempotency_key or len(idempotency_key) > 200:
        raise InvalidRequest("idempotency_key", "must be 1 to 200 characters")
    if kind != EntryKind.ADJUSTMENT and amount <= 0:
        raise InvalidRequest("amount", "must be greater than zero")
    if kind == EntryKind.ADJUSTMENT and amount == 0:
        raise InvalidRequest("amount", "must not be zero")
    balance, held = await _locked_tenant(db, tenant_id)
    if balance + amount < held:
        raise Conflict(
            "this adjustment would leave open reservations uncovered: "
            f"balance {balance}, held {held}, change {amount} (micro-credits)"
        )
    added = await _append(
        db,
        tenant_id=tenant_id,
        task_id=task_id,
        kind=kind.value,
        amount_micros=amount,
        idempotency_key=idempotency_key,
        reason=reason,
    )
    if not added:
        earlier = (
            await _exec(
                db,
                select(ledger.c.tenant_id, ledger.c.kind, ledger.c.amount_micros).where(
                    ledger.c.idempotency_key == idempotency_key
                ),
            )
        ).one()
        if tuple(earlier) != (tenant_id, kind.value, amount):
            raise Conflict("idempotency_key: already used for a different credit change")
        return False
    await _exec(
        db,
        update(tenants)
        .where(tenants.c.id == tenant_id)
        .values(balance_micros=tenants.c.balance_micros + amount),
    )
    return True


def parse_amount(value: Decimal, field: str = "amount") -> int:
    """Credits as given by a person → micro-credits, exactly, or a 400 naming the field."""
    try:
        return micros_from_signed_text(str(value))
    except MoneyError as exc:
        raise InvalidRequest(field, str(exc)) from None


async def change_credits(
    session: AsyncSession, tenant_id: str, data: CreditChange, kind: EntryKind
) -> dict[str, Any]:
    """An operator's top-up or adjustment, then the balance after it (admin API and CLI)."""
    await get_tenant(session, tenant_id)
    amount = parse_amount(data.amount)
    if kind == EntryKind.ADJUSTMENT and not data.reason.strip():
        raise InvalidRequest("reason", "an adjustment needs a reason")
    # An operator's key is scoped to the tenant and the kind of move, so it can
    # neither collide with another tenant's nor with the system's hold:/settle: keys.
    if data.idempotency_key is not None and not 0 < len(data.idempotency_key) <= 120:
        raise InvalidRequest("idempotency_key", "must be 1 to 120 characters")
    key = f"op:{tenant_id}:{kind.value}:{data.idempotency_key or uuid.uuid4()}"
    if data.task_id is not None:
        if kind != EntryKind.ADJUSTMENT:
            raise InvalidRequest("task_id", "only an adjustment names a task")
        owner = (
            await _exec(session, select(tasks.c.tenant_id).where(tasks.c.id == data.task_id))
        ).scalar_one_or_none()
        if owner != tenant_id:
            raise InvalidRequest("task_id", f"no task {data.task_id} of tenant {tenant_id}")
    applied = await credit(
        session,
        tenant_id,
        amount,
        kind=kind,
        idempotency_key=key,
        reason=data.reason,
        task_id=data.task_id,
    )
    result = balance_json(tenant_id, await balance(session, tenant_id))
    result["applied"] = applied
    return result


async def refund(db: Db, task_id: str, amount: int | None, reason: str) -> int:
    """Give back part or all of what a task was charged; returns the micro-credits refunded."""
    row = (
        await _exec(
            db,
            select(tasks.c.tenant_id, tasks.c.credits_charged_micros).where(tasks.c.id == task_id),
        )
    ).first()
    if row is None:
        raise NotFound(f"no task {task_id}")
    tenant_id, charged = row
    await _locked_tenant(db, tenant_id)  # serialises refunds of one tenant
    refunded = (
        await _exec(
            db,
            select(func.coalesce(func.sum(ledger.c.amount_micros), 0)).where(
                ledger.c.task_id == task_id, ledger.c.kind == EntryKind.REFUND.value
            ),
        )
    ).scalar_one()
    left = (charged or 0) - int(refunded)
    amount = left if amount is None else amount
    if amount <= 0 or amount > left:
        raise Conflict(f"task {task_id} has {left} micro-credits left to refund")
    number = (
        await _exec(
            db,
            select(func.count()).where(
                ledger.c.task_id == task_id, ledger.c.kind == EntryKind.REFUND.value
            ),
        )
    ).scalar_one()
    await credit(
        db,
        tenant_id,
        amount,
        kind=EntryKind.REFUND,
        idempotency_key=f"refund:{task_id}:{number + 1}",
        reason=reason,
        task_id=task_id,
    )
    return amount


@dataclass(frozen=True, slots=True)
class Balance:
    balance_micros: int
    held_micros: int
    open_holds: list[dict[str, Any]]

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.held_micros


async def balance(db: Db, tenant_id: str) -> Balance:
    row = (
        await _exec(
            db,
            select(tenants.c.balance_micros, tenants.c.held_micros).where(
                tenants.c.id == tenant_id
            ),
        )
    ).first()
    if row is None:
        raise NotFound(f"no tenant {tenant_id}")
    settled = select(ledger.c.task_id).where(
        ledger.c.kind.in_([EntryKind.CAPTURE.value, EntryKind.RELEASE.value]),
        ledger.c.tenant_id == tenant_id,
    )
    holds = await _exec(
        db,
        select(ledger.c.task_id, ledger.c.amount_micros, ledger.c.created_at)
        .where(
            ledger.c.tenant_id == tenant_id,
            ledger.c.kind == EntryKind.HOLD.value,
            ledger.c.task_id.not_in(settled),
        )
        .order_by(ledger.c.created_at),
    )
    open_holds = [
        {"task_id": t, "amount_micros": a, "created_at": c.isoformat()} for t, a, c in holds
    ]
    return Balance(balance_micros=row[0], held_micros=row[1], open_holds=open_holds)


def balance_json(tenant_id: str, held: Balance) -> dict[str, Any]:
    """A tenant's balance as the admin API and the CLI show it: credits and micro-credits."""
    return {
        "tenant_id": tenant_id,
        "balance": credits_from_micros(held.balance_micros),
        "held": credits_from_micros(held.held_micros),
        "available": credits_from_micros(held.available_micros),
        "balance_micros": held.balance_micros,
        "held_micros": held.held_micros,
        "available_micros": held.available_micros,
        "open_holds": held.open_holds,
    }


_CHECKS: tuple[tuple[str, str], ...] = (
    (
        "balance differs from its ledger",
        """
        SELECT t.id, t.balance_micros, COALESCE(SUM(CASE
            WHEN l.kind IN ('topup', 'refund', 'adjustment') THEN l.amount_micros
            WHEN l.kind = 'capture' THEN -l.amount_micros ELSE 0 END), 0)
        FROM tenants t LEFT JOIN ledger_entries l ON l.tenant_id = t.id
        GROUP BY t.id HAVING t.balance_micros <> COALESCE(SUM(CASE
            WHEN l.kind IN ('topup', 'refund', 'adjustment') THEN l.amount_micros
            WHEN l.kind = 'capture' THEN -l.amount_micros ELSE 0 END), 0)
        """,
    ),
    (
        "held credits differ from the open holds",
        """
        SELECT t.id, t.held_micros, COALESCE(SUM(CASE
            WHEN l.kind = 'hold' THEN l.amount_micros
            WHEN l.kind IN ('capture', 'release') THEN -l.hold_micros ELSE 0 END), 0)
        FROM tenants t LEFT JOIN ledger_entries l ON l.tenant_id = t.id
        GROUP BY t.id HAVING t.held_micros <> COALESCE(SUM(CASE
            WHEN l.kind = 'hold' THEN l.amount_micros
            WHEN l.kind IN ('capture', 'release') THEN -l.hold_micros ELSE 0 END), 0)
        """,
    ),
    (
        "a hold settled more than once (captured and released, or twice)",
        """
        SELECT task_id, COUNT(*), STRING_AGG(kind, ',') FROM ledger_entries
        WHERE kind IN ('capture', 'release') GROUP BY task_id HAVING COUNT(*) > 1
        """,
    ),
    (
        "a settlement that does not match its hold",
        """
        SELECT s.task_id, s.kind, s.amount_micros, s.hold_micros, h.amount_micros
        FROM ledger_entries s LEFT JOIN ledger_entries h
          ON h.task_id = s.task_id AND h.kind = 'hold'
        WHERE s.kind IN ('capture', 'release') AND (h.id IS NULL
          OR s.hold_micros <> h.amount_micros
          OR (s.kind = 'release' AND s.amount_micros <> h.amount_micros)
          OR (s.kind = 'capture' AND s.amount_micros > h.amount_micros))
        """,
    ),
    (
        "a finished task whose hold is still open",
        f"""
        SELECT t.id, t.status FROM tasks t
        JOIN ledger_entries h ON h.task_id = t.id AND h.kind = 'hold'
        WHERE t.status IN ({", ".join(f"'{s.value}'" for s in FINAL_STATES)})
          AND NOT EXISTS (SELECT 1 FROM ledger_entries s WHERE s.task_id = t.id
                          AND s.kind IN ('capture', 'release'))
        """,
    ),
    (
        "an open task whose hold is already settled",
        """
        SELECT t.id, t.status FROM tasks t
        JOIN ledger_entries s ON s.task_id = t.id AND s.kind IN ('capture', 'release')
        WHERE t.status IN ('pending', 'processing')
        """,
    ),
    (
        "tasks in flight differ from the open tasks",
        """
        SELECT t.id, t.in_flight, COUNT(k.id) FROM tenants t
        LEFT JOIN tasks k ON k.tenant_id = t.id AND k.status IN ('pending', 'processing')
        GROUP BY t.id HAVING t.in_flight <> COUNT(k.id)
        """,
    ),
    (
        "a task charged other than its capture",
        """
        SELECT t.id, t.credits_charged_micros, s.kind, s.amount_micros FROM tasks t
        JOIN ledger_entries s ON s.task_id = t.id AND s.kind IN ('capture', 'release')
        WHERE t.credits_charged_micros IS DISTINCT FROM
              CASE WHEN s.kind = 'capture' THEN s.amount_micros ELSE 0 END
        """,
    ),
)


async def check(db: Db) -> list[str]:
    """Every way the ledger and the running totals disagree; empty when all is well."""
    problems: list[str] = []
    for title, sql in _CHECKS:
        for row in await _exec(db, text(sql)):
            problems.append(f"{title}: {tuple(row)}")
    return problems
