"""Tenants and keys: create, find, list, issue, revoke, and how an operator sees them.

Services take the session first and never commit. Used by the admin routes
(``routes.py``) and the CLI alike.
"""

import re
import secrets
from dataclasses import dataclass
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
    name = name.strip()
    if not name or len(name) > 200 or "\x00" in name:
        raise InvalidRequest("name", "must be 1 to 200 characters, without NUL")
    if not _GROUP.match(user_group):
        raise InvalidRequest("user_group", "must be 1 to 100 letters, digits, '_', '.' or '-'")
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


async def issue_key(session: AsyncSession, tenant: Tenant, *, name: str = "") -> IssuedKey:
    if len(name) > 200 or "\x00" in name:
        raise InvalidRequest("name", "must be at most 200 characters")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant.id,
        name=name,
        display_prefix=secret[:DISPLAY_CHARS],
        key_hash=hash_key(secret),
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
        "created_at": tenant.created_at.isoformat(),
    }


def key_json(key: ApiKey) -> dict[str, Any]:
    """A key as the admin API and the CLI show it: never its secret, which is not stored."""
    return {
        "id": key.id,
        "tenant_id": key.tenant_id,
        "name": key.name,
        "prefix": key.display_prefix,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }
