"""What the console's tenant pages read, as small query functions over the ORM models.

Stand-ins for the tenant self-service API's services (issue 16 item 1, built on
another branch): each takes the tenant's id and filters by it, so a page can only
ever show its own tenant's rows. When that API lands, these become calls into it.
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import Principal
from gateway.callbacks.models import CallbackDelivery
from gateway.errors import NotFound
from gateway.ledger.models import EntryKind, LedgerEntry
from gateway.tasks.models import Task, TaskStatus
from gateway.tenants.models import ApiKey, Tenant
from gateway.tenants.service import issue_key

OPEN = (TaskStatus.PENDING.value, TaskStatus.PROCESSING.value)
CONSOLE_KEY_NAME = "console"  # the key playground tasks are submitted under


@dataclass(frozen=True, slots=True)
class TaskFilters:
    status: str | None = None
    model: str | None = None
    since: date | None = None
    until: date | None = None
    # The cursor: tasks older than this one of the tenant's (the last of the page before).
    before: str | None = None


async def tenant_tasks(
    session: AsyncSession, tenant_id: str, filters: TaskFilters, limit: int = 50
) -> list[Task]:
    query = (
        select(Task)
        .where(Task.tenant_id == tenant_id)
        .order_by(col(Task.created_at).desc(), col(Task.id).desc())
        .limit(limit)
    )
    if filters.status:
        query = query.where(Task.status == filters.status)
    if filters.model:
        query = query.where(Task.model == filters.model)
    if filters.since:
        query = query.where(col(Task.created_at) >= _start(filters.since))
    if filters.until:
        query = query.where(col(Task.created_at) < _start(filters.until + timedelta(days=1)))
    if filters.before:
        cursor = await session.get(Task, filters.before)
        if cursor is None or cursor.tenant_id != tenant_id:
            raise NotFound(f"no task {filters.before}")
        query = query.where(
            sa.tuple_(col(Task.created_at), col(Task.id)) < sa.tuple_(cursor.created_at, cursor.id)
        )
    return list((await session.exec(query)).all())


async def tenant_task(session: AsyncSession, tenant_id: str, task_id: str) -> Task:
    """The tenant's task; another tenant's is as unknown as one that does not exist."""
    task = await session.get(Task, task_id)
    if task is None or task.tenant_id != tenant_id:
        raise NotFound(f"no task {task_id}")
    return task


async def in_flight(session: AsyncSession, tenant_id: str) -> list[Task]:
    query = (
        select(Task)
        .where(Task.tenant_id == tenant_id, col(Task.status).in_(OPEN))
        .order_by(col(Task.created_at).desc())
        .limit(20)
    )
    return list((await session.exec(query)).all())


def _start(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), tzinfo=UTC)


async def spend_per_day(
    session: AsyncSession, tenant_id: str, days: int = 30
) -> list[tuple[date, int]]:
    """Micro-credits captured per day (minus refunds), for the last ``days`` days, zeros kept."""
    today = datetime.now(UTC).date()
    first = today - timedelta(days=days - 1)
    day = sa.func.date(sa.func.timezone("UTC", col(LedgerEntry.created_at)))
    signed = sa.case(
        (col(LedgerEntry.kind) == EntryKind.REFUND.value, -col(LedgerEntry.amount_micros)),
        else_=col(LedgerEntry.amount_micros),
    )
    query = (
        select(day, sa.func.sum(signed))
        .where(
            LedgerEntry.tenant_id == tenant_id,
            col(LedgerEntry.kind).in_([EntryKind.CAPTURE.value, EntryKind.REFUND.value]),
            col(LedgerEntry.created_at) >= _start(first),
        )
        .group_by(day)
    )
    found = {d: int(total) for d, total in (await session.exec(query)).all()}
    return [
        (first + timedelta(days=n), found.get(first + timedelta(days=n), 0)) for n in range(days)
    ]


async def tenant_deliveries(session: AsyncSession, tenant_id: str, limit: int = 50) -> list[Any]:
    query = (
        select(CallbackDelivery)
        .where(CallbackDelivery.tenant_id == tenant_id)
        .order_by(col(CallbackDelivery.created_at).desc())
        .limit(limit)
    )
    return list((await session.exec(query)).all())


async def tenant_key(session: AsyncSession, tenant_id: str, key_id: str) -> ApiKey:
    key = await session.get(ApiKey, key_id)
    if key is None or key.tenant_id != tenant_id:
        raise NotFound(f"no key {key_id}")
    return key


async def console_principal(session: AsyncSession, tenant: Tenant) -> Principal:
    """The caller a playground submit runs as: the tenant's own ``console`` key (issued the
    first time, its secret discarded), with the key's and the tenant's limits as the API's."""
    query = select(ApiKey).where(
        ApiKey.tenant_id == tenant.id,
        ApiKey.name == CONSOLE_KEY_NAME,
        col(ApiKey.revoked_at).is_(None),
    )
    key = (await session.exec(query)).first()
    if key is None:
        key = (await issue_key(session, tenant, name=CONSOLE_KEY_NAME)).key
    lists = [frozenset(m) for m in (key.allowed_models, tenant.allowed_models) if m is not None]
    return Principal(
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        key_id=key.id,
        user_group=tenant.user_group,
        key_rate_per_minute=key.rate_limit_per_minute,
        key_rate_burst=key.rate_limit_burst,
        tenant_rate_per_minute=tenant.rate_limit_per_minute,
        tenant_rate_burst=tenant.rate_limit_burst,
        max_in_flight=tenant.max_in_flight,
        allowed_models=frozenset.intersection(*lists) if lists else None,
        budget_total_micros=key.budget_total_micros,
        budget_daily_micros=key.budget_daily_micros,
        budget_monthly_micros=key.budget_monthly_micros,
    )


async def search_tenants(session: AsyncSession, text: str, limit: int = 100) -> list[Tenant]:
    query = select(Tenant).order_by(col(Tenant.created_at).desc()).limit(limit)
    if text.strip():
        pattern = "%" + text.strip().replace("%", r"\%").replace("_", r"\_") + "%"
        query = query.where(col(Tenant.name).ilike(pattern) | (col(Tenant.id) == text.strip()))
    return list((await session.exec(query)).all())
