"""A key's lifecycle beyond issue and revoke: rotation, and the tenant's own key routes.

Rules:
- **Rotation** gives a key a new secret and keeps its id, limits, budgets and
  spend; the old secret keeps working until the end of a grace period given by
  the caller (``TOLLGATE_KEY_ROTATION_GRACE_SECONDS`` by default). Rotating again
  ends the grace of the secret before (only one old secret is kept).
- **Expiry** (``expires_at``) is checked on every request from the cached key
  (``gateway/auth.py``), so a key stops at that instant on every gateway.
- **The tenant's own keys** (``/v1/keys``) need a key with ``can_manage_keys``.
  A key it makes is never wider than the key that makes it: its models are among
  the maker's, each of its budgets at most the maker's (the maker's when left
  out), its expiry no later than the maker's; it takes the maker's rate limits,
  and gets key management only when asked for. Another tenant's key is answered
  as one that does not exist. ``*_own_*`` take the calling key (``Principal``);
  ``create_tenant_key`` and ``revoke_tenant_key`` take a tenant id, for a caller
  that is not a key (the web console's signed-in user): with no maker, a new key
  is bounded by the tenant's own model list only.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import Principal, TenantSuspended, require_active
from gateway.db import utcnow
from gateway.errors import Conflict, Forbidden, InvalidRequest, NotFound
from gateway.tenants.models import DISPLAY_CHARS, ApiKey, hash_key
from gateway.tenants.service import IssuedKey, get_tenant, issue_key, new_secret
from pricing.catalog import Catalog

MAX_GRACE_SECONDS = 30 * 86400
PERIODS = ("total", "daily", "monthly")


async def rotate_key(
    session: AsyncSession, key_id: str, grace_seconds: int, *, tenant_id: str | None = None
) -> IssuedKey:
    """A new secret for the key; the old one works ``grace_seconds`` more (0: not at all).

    ``tenant_id`` limits the search to that tenant's keys (the tenant's own route).
    """
    if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:
        raise InvalidRequest("grace_seconds", f"must be 0 to {MAX_GRACE_SECONDS}")
    key = await session.get(ApiKey, key_id, with_for_update=True)
    if key is None or (tenant_id is not None and key.tenant_id != tenant_id):
        raise NotFound(f"no key {key_id}")
    if key.revoked_at is not None:
        raise Conflict(f"key {key_id} is revoked; issue a new one")
    secret = new_secret()
    key.previous_key_hash = key.key_hash
    key.previous_expires_at = utcnow() + timedelta(seconds=grace_seconds)
    key.key_hash = hash_key(secret)
    key.display_prefix = secret[:DISPLAY_CHARS]
    session.add(key)
    await session.flush()
    return IssuedKey(key=key, secret=secret)


@dataclass(frozen=True, slots=True)
class OwnKeyRequest:
    """What a tenant asks for its new key; budgets in micro-credits by period."""

    name: str = ""
    allowed_models: list[str] | None = None
    budgets: dict[str, int | None] | None = None
    expires_at: datetime | None = None
    can_manage_keys: bool = False


def require_key_scope(principal: Principal) -> None:
    if not principal.can_manage_keys:
        raise Forbidden("This key may not manage keys (it lacks the can_manage_keys scope)")


async def list_own_keys(session: AsyncSession, principal: Principal) -> list[ApiKey]:
    require_key_scope(principal)
    query = (
        select(ApiKey)
        .where(ApiKey.tenant_id == principal.tenant_id)
        .order_by(col(ApiKey.created_at))
    )
    return list((await session.exec(query)).all())


async def create_own_key(
    session: AsyncSession, catalog: Catalog, principal: Principal, wanted: OwnKeyRequest
) -> IssuedKey:
    """A key for the caller's tenant, never wider than the caller's key (rules above)."""
    require_key_scope(principal)
    require_active(principal)
    return await create_tenant_key(session, catalog, principal.tenant_id, wanted, maker=principal)


async def create_tenant_key(
    session: AsyncSession,
    catalog: Catalog,
    tenant_id: str,
    wanted: OwnKeyRequest,
    *,
    maker: Principal | None = None,
) -> IssuedKey:
    """A key for the tenant, never wider than ``maker`` (a key), or than the tenant's
    model list when there is no maker. A suspended tenant gets none (403)."""
    tenant = await get_tenant(session, tenant_id)
    if tenant.suspended_at is not None:
        raise TenantSuspended()
    ceiling = (
        maker.allowed_models
        if maker is not None
        else (None if tenant.allowed_models is None else frozenset(tenant.allowed_models))
    )
    models = _narrow_models(catalog, ceiling, wanted.allowed_models)
    budgets: dict[str, int | None] = {}
    for period in PERIODS:
        mine = None if maker is None else getattr(maker, f"budget_{period}_micros")
        asked = (wanted.budgets or {}).get(period)
        if mine is not None and asked is not None and asked > mine:
            raise InvalidRequest(f"budget_{period}", "must not exceed this key's own budget")
        budgets[period] = mine if asked is None else asked
    expires_at = wanted.expires_at
    if maker is not None and maker.expires_at is not None:
        mine_ends = datetime.fromtimestamp(maker.expires_at, tz=utcnow().tzinfo)
        if expires_at is None:
            expires_at = mine_ends
        elif expires_at > mine_ends:
            raise InvalidRequest("expires_at", "must not be later than this key's own expiry")
    return await issue_key(
        session,
        tenant,
        name=wanted.name,
        expires_at=expires_at,
        can_manage_keys=wanted.can_manage_keys,
        allowed_models=models,
        budgets=budgets,
        rate_limit_per_minute=None if maker is None else maker.key_rate_per_minute,
        rate_limit_burst=None if maker is None else maker.key_rate_burst,
    )


def _narrow_models(
    catalog: Catalog, mine: frozenset[str] | None, asked: list[str] | None
) -> list[str] | None:
    if asked is None:
        return None if mine is None else sorted(mine)
    unknown = sorted({m for m in asked if catalog.model(m) is None})
    if unknown:
        raise InvalidRequest("allowed_models", f"unknown model(s): {', '.join(unknown)}")
    if mine is not None and not set(asked) <= mine:
        wider = ", ".join(sorted(set(asked) - mine))
        raise InvalidRequest("allowed_models", f"this key may not use: {wider}")
    return sorted(set(asked))


async def revoke_own_key(session: AsyncSession, principal: Principal, key_id: str) -> ApiKey:
    require_key_scope(principal)
    return await revoke_tenant_key(session, principal.tenant_id, key_id)


async def revoke_tenant_key(session: AsyncSession, tenant_id: str, key_id: str) -> ApiKey:
    """Revoke one of the tenant's keys; another tenant's key is a 404."""
    key = await session.get(ApiKey, key_id, with_for_update=True)
    if key is None or key.tenant_id != tenant_id:
        raise NotFound(f"no key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        await session.flush()
    return key
