"""Tenants and keys: create, find, list, change, suspend, delete, issue, revoke, and how an
operator sees them (a key's expiry, rotation and the tenant's own key routes: ``keys.py``).

Services take the session first and never commit. Used by the admin routes
(``routes.py``) and the CLI alike.
"""

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db import get_or_404, utcnow
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.tenants.models import DISPLAY_CHARS, KEY_PREFIX, ApiKey, Tenant, hash_key, new_id
from pricing.money import credits_from_micros

_GROUP = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: ApiKey
    secret: str  # the only time the full key exists outside the client


async def create_tenant(session: AsyncSession, *, name: str, user_group: str = "default") -> Tenant:
    name = _check_name(name)
    _check_group(user_group)
    existing = await session.exec(select(Tenant).where(Tenant.name == name))
    if existing.first() is not None:
        raise Conflict(f"a tenant named {name!r} already exists")
    tenant = Tenant(id=new_id("ten"), name=name, user_group=user_group)
    session.add(tenant)
    await session.flush()
    return tenant


async def get_tenant(session: AsyncSession, tenant_id: str) -> Tenant:
    return await get_or_404(session, Tenant, tenant_id, f"no tenant {tenant_id}")


async def find_tenant(session: AsyncSession, ref: str) -> Tenant:
    """A tenant by id or by name (for the CLI)."""
    tenant = await session.get(Tenant, ref)
    if tenant is None:
        tenant = (await session.exec(select(Tenant).where(Tenant.name == ref))).first()
    if tenant is None:
        raise NotFound(f"no tenant with id or name {ref!r}")
    return tenant


async def list_tenants(session: AsyncSession) -> list[Tenant]:
    return list((await session.exec(select(Tenant).order_by(col(Tenant.created_at)))).all())


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 200 or "\x00" in name:
        raise InvalidRequest("name", "must be 1 to 200 characters, without NUL")
    return name


def _check_group(user_group: str) -> str:
    if not _GROUP.match(user_group):
        raise InvalidRequest("user_group", "must be 1 to 100 letters, digits, '_', '.' or '-'")
    return user_group


async def update_tenant(
    session: AsyncSession,
    tenant_id: str,
    *,
    name: str | None = None,
    user_group: str | None = None,
    suspended: bool | None = None,
) -> Tenant:
    """Rename, regroup, suspend or resume a tenant; None leaves a field as it is.

    Reaches every gateway within ``key_cache_ttl_seconds`` (the keys' cache carries
    the group and the suspension). A deleted tenant cannot be resumed (409).
    """
    tenant = await session.get(Tenant, tenant_id, with_for_update=True)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id}")
    if name is not None:
        name = _check_name(name)
        if name != tenant.name:
            taken = await session.exec(select(Tenant).where(Tenant.name == name))
            if taken.first() is not None:
                raise Conflict(f"a tenant named {name!r} already exists")
            tenant.name = name
    if user_group is not None:
        tenant.user_group = _check_group(user_group)
    if suspended is True and tenant.suspended_at is None:
        tenant.suspended_at = utcnow()
    elif suspended is False and tenant.suspended_at is not None:
        if tenant.deleted_at is not None:
            raise Conflict(f"tenant {tenant_id} is deleted and cannot be resumed")
        tenant.suspended_at = None
    session.add(tenant)
    await session.flush()
    return tenant


async def delete_tenant(session: AsyncSession, tenant_id: str) -> Tenant:
    """Suspend the tenant for good and revoke every key; its ledger and tasks stay.

    Its open tasks still finish and settle (the workers need no key).
    """
    tenant = await session.get(Tenant, tenant_id, with_for_update=True)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id}")
    now = utcnow()
    tenant.suspended_at = tenant.suspended_at or now
    tenant.deleted_at = tenant.deleted_at or now
    session.add(tenant)
    for key in await list_keys(session, tenant_id):
        if key.revoked_at is None:
            key.revoked_at = now
            session.add(key)
    await session.flush()
    return tenant


async def issue_key(
    session: AsyncSession,
    tenant: Tenant,
    *,
    name: str = "",
    expires_at: datetime | None = None,
    can_manage_keys: bool = True,
    allowed_models: list[str] | None = None,
    budgets: dict[str, int | None] | None = None,
    rate_limit_per_minute: int | None = None,
    rate_limit_burst: int | None = None,
) -> IssuedKey:
    """A new key; its secret is returned once. ``budgets``: micro-credits by
    ``total``/``daily``/``monthly``. Checked against the time: no expiry in the past."""
    if len(name) > 200 or "\x00" in name:
        raise InvalidRequest("name", "must be at most 200 characters")
    if tenant.deleted_at is not None:
        raise Conflict(f"tenant {tenant.id} is deleted: it gets no new keys")
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidRequest("expires_at", "must be in the future")
    secret = new_secret()
    budgets = budgets or {}
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant.id,
        name=name,
        display_prefix=secret[:DISPLAY_CHARS],
        key_hash=hash_key(secret),
        expires_at=expires_at,
        can_manage_keys=can_manage_keys,
        allowed_models=allowed_models,
        budget_total_micros=budgets.get("total"),
        budget_daily_micros=budgets.get("daily"),
        budget_monthly_micros=budgets.get("monthly"),
        rate_limit_per_minute=rate_limit_per_minute,
        rate_limit_burst=rate_limit_burst,
    )
    session.add(key)
    await session.flush()
    return IssuedKey(key=key, secret=secret)


async def list_keys(session: AsyncSession, tenant_id: str) -> list[ApiKey]:
    query = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(col(ApiKey.created_at))
    return list((await session.exec(query)).all())


async def get_key(session: AsyncSession, key_id: str) -> ApiKey:
    return await get_or_404(session, ApiKey, key_id, f"no key {key_id}")


async def revoke_key(session: AsyncSession, key_id: str) -> ApiKey:
    key = await get_key(session, key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        await session.flush()
    return key


def tenant_json(tenant: Tenant) -> dict[str, Any]:
    """A tenant as the admin API and the CLI show it."""
    return {
        "id": tenant.id,
        "name": tenant.name,
        "user_group": tenant.user_group,
        "balance": credits_from_micros(tenant.balance_micros),
        "held": credits_from_micros(tenant.held_micros),
        "suspended": tenant.suspended_at is not None,
        "suspended_at": _iso(tenant.suspended_at),
        "deleted_at": _iso(tenant.deleted_at),
        "created_at": tenant.created_at.isoformat(),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def key_json(key: ApiKey) -> dict[str, Any]:
    """A key as the admin API and the CLI show it: never its secret, which is not stored."""
    return {
        "id": key.id,
        "tenant_id": key.tenant_id,
        "name": key.name,
        "prefix": key.display_prefix,
        "created_at": key.created_at.isoformat(),
        "revoked_at": _iso(key.revoked_at),
        "expires_at": _iso(key.expires_at),
        "can_manage_keys": key.can_manage_keys,
        # After a rotation: until when the old secret still works.
        "previous_secret_expires_at": _iso(key.previous_expires_at),
        "allowed_models": key.allowed_models,
        "budgets": {
            period: None if micros is None else credits_from_micros(micros)
            for period, micros in (
                ("total", key.budget_total_micros),
                ("daily", key.budget_daily_micros),
                ("monthly", key.budget_monthly_micros),
            )
        },
    }
