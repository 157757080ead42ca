"""What the console reads that the tenant self-service API has no service for.

The tenant pages read the account, tasks, usage and keys through the API's own
services (``gateway/account/service.py``, ``gateway/tenants/keys.py``,
``gateway/redemption/service.py``), so the console and the API cannot disagree. What
is left here is the console's own: the spend chart, the delivery log, the playground's
caller and the operator's tenant search. Each tenant query takes the tenant's id and
filters by it.
"""

from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import Principal, TenantSuspended
from gateway.callbacks.models import CallbackDelivery
from gateway.ledger.models import EntryKind, LedgerEntry
from gateway.tasks.models import TaskStatus
from gateway.tenants.models import ApiKey, Tenant
from gateway.tenants.service import issue_key

OPEN = (TaskStatus.PENDING.value, TaskStatus.PROCESSING.value)
CONSOLE_KEY_NAME = "console"  # the key playground tasks are submitted under


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


async def console_principal(session: AsyncSession, tenant: Tenant) -> Principal:
    """The caller a playground submit runs as: the tenant's own ``console`` key (issued the
    first time without an expiry or the key-management scope, its secret discarded), with
    the key's and the tenant's limits and the tenant's suspension, as the API's.

    A console key that was revoked or given an expiry (through the admin API) is not
    used: a new one is issued, so the playground never stops on a key the tenant cannot
    see. A deleted tenant gets none: 403 ``tenant_suspended``, like any of its keys' submits.
    """
    if tenant.deleted_at is not None:
        raise TenantSuspended()
    query = (
        select(ApiKey)
        .where(
            ApiKey.tenant_id == tenant.id,
            ApiKey.name == CONSOLE_KEY_NAME,
            col(ApiKey.revoked_at).is_(None),
            col(ApiKey.expires_at).is_(None),
        )
        .order_by(col(ApiKey.created_at))
    )
    key = (await session.exec(query)).first()
    if key is None:
        issued = await issue_key(session, tenant, name=CONSOLE_KEY_NAME, can_manage_keys=False)
        key = issued.key
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
        suspended=tenant.suspended_at is not None,
        expires_at=None,
        can_manage_keys=False,
    )


async def search_tenants(session: AsyncSession, text: str, limit: int = 100) -> list[Tenant]:
    query = select(Tenant).order_by(col(Tenant.created_at).desc()).limit(limit)
    if text.strip():
        pattern = "%" + text.strip().replace("%", r"\%").replace("_", r"\_") + "%"
        query = query.where(col(Tenant.name).ilike(pattern) | (col(Tenant.id) == text.strip()))
    return list((await session.exec(query)).all())
