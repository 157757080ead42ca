"""Bearer-key authentication with a short-lived per-process cache.

A cached key costs no database round trip. Each entry (found or not found)
lives ``key_cache_ttl_seconds``, which bounds how long a revoked key, or a
suspended tenant's key, keeps its old rights on any gateway process. A key's
expiry is different: the cached entry carries ``expires_at`` and every request
compares it with the clock, so a key stops at that instant, cached or not. A
rotated key's old secret is found by its own hash (``previous_key_hash``) and
expires at the end of its grace period the same way. A key's lookup runs once however many requests
wait for it: a burst from a key not yet cached (a thousand submits at once, or
the same after its entry expired) makes one query, not one per request, which
would empty the connection pool. The admin API's credential is separate and
compared in constant time.
"""

import asyncio
import hmac
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import Forbidden, Unauthorized
from gateway.tenants.models import KEY_PREFIX, ApiKey, Tenant, hash_key


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and the limits that apply: resolved once per key and cached."""

    tenant_id: str
    tenant_name: str
    key_id: str
    user_group: str
    # Limits as stored (None: the settings' default; 0: none); see gateway/limits/service.py.
    key_rate_per_minute: int | None = None
    key_rate_burst: int | None = None
    tenant_rate_per_minute: int | None = None
    tenant_rate_burst: int | None = None
    max_in_flight: int | None = None
    allowed_models: frozenset[str] | None = None
    budget_total_micros: int | None = None
    budget_daily_micros: int | None = None
    budget_monthly_micros: int | None = None
    # Lifecycle: a suspended tenant reads but may not submit; a key stops at expires_at
    # (Unix time); can_manage_keys is the scope of the tenant's key routes.
    suspended: bool = False
    expires_at: float | None = None
    can_manage_keys: bool = True


class TenantSuspended(Forbidden):
    code = "tenant_suspended"
    default_message = "This tenant is suspended: it may read its tasks and account but not submit"


def require_active(principal: Principal) -> None:
    """Refuse a suspended tenant's change (submits, new keys): 403 ``tenant_suspended``."""
    if principal.suspended:
        raise TenantSuspended()


class KeyExpired(Unauthorized):
    code = "key_expired"
    default_message = "This API key has expired; use or create another one"


def bearer_token(header: str | None) -> str:
    if not header:
        raise Unauthorized("Missing Authorization header: use `Authorization: Bearer <key>`")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header must be `Bearer <key>`")
    return token.strip()


class KeyCache:
    def __init__(self, engine: AsyncEngine, ttl_seconds: float) -> None:
        self._engine = engine
        self._ttl = ttl_seconds
        self._entries: dict[str, tuple[float, Principal | None]] = {}
        self._loading: dict[str, asyncio.Future[Principal | None]] = {}

    async def authenticate(self, header: str | None) -> Principal:
        token = bearer_token(header)
        if not token.startswith(KEY_PREFIX):
            raise Unauthorized()
        digest = hash_key(token)
        now = time.monotonic()
        cached = self._entries.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            loading = self._loading.get(digest)
            if loading is None:
                loading = asyncio.ensure_future(self._load_and_keep(digest, now))
                self._loading[digest] = loading
                loading.add_done_callback(lambda _: self._loading.pop(digest, None))
            # Shielded: a waiter that gives up must not cancel the others' lookup.
            principal = await asyncio.shield(loading)
        if principal is None:
            raise Unauthorized()
        if principal.expires_at is not None and time.time() >= principal.expires_at:
            raise KeyExpired()
        return principal

    async def _load_and_keep(self, digest: str, now: float) -> Principal | None:
        principal = await self._load(digest)
        if len(self._entries) > 100_000:
            # Bounded: random bad keys must not grow memory without limit.
            self._entries.clear()
        self._entries[digest] = (now + self._ttl, principal)
        return principal

    async def _load(self, digest: str) -> Principal | None:
        keys, tenants = ApiKey.__table__.c, Tenant.__table__.c  # type: ignore[attr-defined]
        query = (
            select(
                keys.id,
                keys.revoked_at,
                tenants.id,
                tenants.name,
                tenants.user_group,
                keys.rate_limit_per_minute,
                keys.rate_limit_burst,
                tenants.rate_limit_per_minute,
                tenants.rate_limit_burst,
                tenants.max_in_flight,
                keys.allowed_models,
                tenants.allowed_models,
                keys.budget_total_micros,
                keys.budget_daily_micros,
                keys.budget_monthly_micros,
                tenants.suspended_at,
                keys.expires_at,
                keys.can_manage_keys,
                keys.key_hash,
                keys.previous_expires_at,
            )
            .join_from(ApiKey.__table__, Tenant.__table__, tenants.id == keys.tenant_id)  # type: ignore[attr-defined]
            .where(or_(keys.key_hash == digest, keys.previous_key_hash == digest))
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None or row[1] is not None:
            return None
        expiry = [row[16]]
        if row[18] != digest:  # a rotated key's old secret: valid until its grace ends
            expiry.append(row[19] or datetime.min.replace(tzinfo=UTC))
        ends = [e.timestamp() for e in expiry if e is not None]
        return Principal(
            tenant_id=row[2],
            tenant_name=row[3],
            key_id=row[0],
            user_group=row[4],
            key_rate_per_minute=row[5],
            key_rate_burst=row[6],
            tenant_rate_per_minute=row[7],
            tenant_rate_burst=row[8],
            max_in_flight=row[9],
            allowed_models=_both(row[10], row[11]),
            budget_total_micros=row[12],
            budget_daily_micros=row[13],
            budget_monthly_micros=row[14],
            suspended=row[15] is not None,
            expires_at=min(ends) if ends else None,
            can_manage_keys=row[17],
        )


def _both(key_models: list[str] | None, tenant_models: list[str] | None) -> frozenset[str] | None:
    """Models allowed by both lists; None when neither restricts."""
    lists = [frozenset(m) for m in (key_models, tenant_models) if m is not None]
    if not lists:
        return None
    return frozenset.intersection(*lists)


def check_admin(header: str | None, admin_token: str) -> None:
    token = bearer_token(header)
    if not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise Unauthorized("Invalid admin token")
