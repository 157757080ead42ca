"""The tenant's view of itself: account, usage and its task list (rules: ``gateway/account``).

Services take the session first and never commit.
"""

import base64
import binascii
import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import tuple_
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import Principal
from gateway.errors import InvalidRequest
from gateway.ledger import reports
from gateway.ledger import service as ledger
from gateway.limits.overrides import key_limits_json, tenant_limits_json
from gateway.settings import Settings
from gateway.tasks.models import Task, TaskStatus
from gateway.tenants.models import ApiKey
from gateway.tenants.service import get_tenant

STATUSES = frozenset(s.value for s in TaskStatus)


async def account(
    session: AsyncSession, settings: Settings, principal: Principal
) -> dict[str, Any]:
    """The tenant, its group, its credits, its limits and the calling key's budgets."""
    found = await tenant_account(session, settings, principal.tenant_id, principal.key_id)
    # The secret in use may be a rotated key's old one, which ends with its grace period.
    found["key"]["expires_at"] = principal_expiry(principal)
    return found


async def tenant_account(
    session: AsyncSession, settings: Settings, tenant_id: str, key_id: str | None = None
) -> dict[str, Any]:
    """A tenant's account; with ``key_id``, that key's limits, budgets and expiry too
    (without: for a caller that is not a key, such as the web console's user)."""
    tenant = await get_tenant(session, tenant_id)
    held = await ledger.balance(session, tenant.id)
    credits = ledger.balance_json(tenant.id, held)
    tenant_limits = tenant_limits_json(tenant, settings)
    tenant_limits.pop("tenant_id")
    found: dict[str, Any] = {
        "tenant": {"id": tenant.id, "name": tenant.name},
        "user_group": tenant.user_group,
        "suspended": tenant.suspended_at is not None,
        **{k: credits[k] for k in ("balance", "held", "available")},
        **{k: credits[k] for k in ("balance_micros", "held_micros", "available_micros")},
        "limits": {"tenant": tenant_limits, "allowed_models": tenant.allowed_models},
    }
    key = None if key_id is None else await session.get(ApiKey, key_id)
    if key is None or key.tenant_id != tenant.id:
        return found
    key_limits = await key_limits_json(session, key, settings)
    found["limits"] = {
        "tenant": tenant_limits,
        "key": {k: key_limits[k] for k in ("rate_limit_per_minute", "rate_limit_burst")},
        "allowed_models": _both(key.allowed_models, tenant.allowed_models),
    }
    found["key"] = {
        "id": key.id,
        "name": key.name,
        "prefix": key.display_prefix,
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "can_manage_keys": key.can_manage_keys,
    }
    found["budgets"] = key_limits["budgets"]
    return found


def _both(key_models: list[str] | None, tenant_models: list[str] | None) -> list[str] | None:
    """Models on both lists, sorted; None when neither restricts."""
    lists = [set(m) for m in (key_models, tenant_models) if m is not None]
    return sorted(set.intersection(*lists)) if lists else None


def principal_expiry(principal: Principal) -> str | None:
    if principal.expires_at is None:
        return None
    return datetime.fromtimestamp(principal.expires_at, tz=UTC).isoformat()


@dataclass(frozen=True, slots=True)
class TaskFilter:
    status: str | None = None
    model: str | None = None
    since: date | None = None  # UTC days, both ends included
    until: date | None = None


def encode_cursor(task: Task) -> str:
    raw = f"{task.created_at.isoformat()}|{task.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, task_id = raw.split("|", 1)
        created = datetime.fromisoformat(moment)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("cursor", "is not a cursor this API gave") from None
    if created.tzinfo is None or not task_id:
        raise InvalidRequest("cursor", "is not a cursor this API gave")
    return created, task_id


async def list_tasks(
    session: AsyncSession,
    tenant_id: str,
    filters: TaskFilter,
    *,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Task], str | None]:
    """A page of the tenant's tasks, newest first, and the cursor of the next (None: last)."""
    if filters.status is not None and filters.status not in STATUSES:
        raise InvalidRequest("status", f"must be one of {', '.join(sorted(STATUSES))}")
    if filters.since and filters.until and filters.since > filters.until:
        raise InvalidRequest("since", "must not be after until")
    created, task_id = col(Task.created_at), col(Task.id)
    query = select(Task).where(Task.tenant_id == tenant_id)
    if filters.status is not None:
        query = query.where(Task.status == filters.status)
    if filters.model is not None:
        query = query.where(Task.model == filters.model)
    if filters.since is not None:
        query = query.where(created >= datetime.combine(filters.since, time.min, tzinfo=UTC))
    if filters.until is not None:
        end = datetime.combine(filters.until + timedelta(days=1), time.min, tzinfo=UTC)
        query = query.where(created < end)
    if cursor is not None:
        after_created, after_id = decode_cursor(cursor)
        # A row comparison, which PostgreSQL uses as the index condition (an OR of the
        # two cases would be a filter: a deep page would read every row before it).
        query = query.where(tuple_(created, task_id) < tuple_(after_created, after_id))
    query = query.order_by(created.desc(), task_id.desc()).limit(limit + 1)
    found = list((await session.exec(query)).all())
    page = found[:limit]
    following = encode_cursor(page[-1]) if len(found) > limit else None
    return page, following


# What a tenant sees of the usage report: what it was charged and given back (refunds,
# adjustments naming a task); the operator's upstream cost and margin stay out.
USAGE_COLUMNS = reports.COLUMNS[: reports.COLUMNS.index("upstream_cost")]
_MICROS = tuple(f"{name}_micros" for name in ("charged", "refunded", "adjusted", "net"))


async def usage(
    session: AsyncSession, tenant_id: str, since: date | None, until: date | None
) -> list[dict[str, Any]]:
    """The tenant's usage per UTC day and model (the last 30 days unless told)."""
    if since and until and since > until:
        raise InvalidRequest("since", "must not be after until")
    rows = await reports.usage(session, tenant_id, since, until)
    return [{k: row[k] for k in (*USAGE_COLUMNS, *_MICROS)} for row in rows]


def usage_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(USAGE_COLUMNS)
    for row in rows:
        writer.writerow([row[column] for column in USAGE_COLUMNS])
    return out.getvalue()
