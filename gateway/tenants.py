"""Tenants and their API keys.

Rules:
- A key is ``tg_`` followed by 43 URL-safe characters (256 bits from
  ``secrets``). It is shown once, when issued; only its SHA-256 is stored, with
  a short display prefix so people can tell their keys apart. A fast hash is
  right here: the key is random, not a password, so there is nothing to guess.
- Revoking sets ``revoked_at``; gateways cache a key for at most
  ``key_cache_ttl_seconds`` (see ``auth.py``), so a revocation reaches every
  process within that time.
"""

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.crypto import WEBHOOK_SECRET, Sealed
from gateway.db import utcnow
from gateway.errors import Conflict, InvalidRequest, NotFound

KEY_PREFIX = "tg_"
_GROUP = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
DISPLAY_CHARS = 10  # "tg_" plus seven characters: enough to tell keys apart


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def new_webhook_secret() -> str:
    """``whsec_`` and 32 random bytes in base64, the Standard Webhooks secret format."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"
    __table_args__ = (
        # The ledger's running totals: open holds never exceed the balance.
        sa.CheckConstraint("held_micros >= 0", name="ck_tenants_held_not_negative"),
        sa.CheckConstraint("balance_micros >= held_micros", name="ck_tenants_holds_covered"),
        sa.CheckConstraint("in_flight >= 0", name="ck_tenants_in_flight_not_negative"),
    )

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(sa_column_kwargs={"unique": True}, max_length=200)
    user_group: str = Field(default="default", max_length=100)
    # Written only by gateway/ledger, in the same transaction as a ledger row.
    balance_micros: int = Field(default=0, sa_type=sa.BigInteger)
    held_micros: int = Field(default=0, sa_type=sa.BigInteger)
    # Tasks pending or processing; written in the transactions that open and end them.
    in_flight: int = 0
    # Limits (None: the settings' default; 0: no limit). See gateway/limits.py.
    max_in_flight: int | None = None
    rate_limit_per_minute: int | None = None
    rate_limit_burst: int | None = None
    allowed_models: list[str] | None = Field(default=None, sa_type=JSONB)
    # Signs callbacks (Standard Webhooks); the tenant reads and rotates it through the API.
    # Stored encrypted (gateway/crypto.py); reads and writes see the secret itself.
    webhook_secret: str = Field(
        default_factory=lambda: new_webhook_secret(),
        sa_type=Sealed(WEBHOOK_SECRET, 400),
    )
    # "standard": retries after 1, 2, 4 s; "extended" (an operator's opt-in): then hourly for a day.
    callback_schedule: str = Field(default="standard", max_length=20)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=40)
    name: str = Field(default="", max_length=200)
    display_prefix: str = Field(max_length=20)
    key_hash: str = Field(sa_column_kwargs={"unique": True}, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())
    revoked_at: datetime | None = Field(default=None, sa_type=_ts())
    rate_limit_per_minute: int | None = None
    rate_limit_burst: int | None = None
    allowed_models: list[str] | None = Field(default=None, sa_type=JSONB)
    # Spending limits in micro-credits (None: no limit), counted at reservation.
    budget_total_micros: int | None = Field(default=None, sa_type=sa.BigInteger)
    budget_daily_micros: int | None = Field(default=None, sa_type=sa.BigInteger)
    budget_monthly_micros: int | None = Field(default=None, sa_type=sa.BigInteger)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeySpend(SQLModel, table=True):
    """What a key has reserved or spent per period: ``total``, ``day:<date>``, ``month:<month>``."""

    __tablename__ = "key_spend"
    __table_args__ = (sa.CheckConstraint("spent_micros >= 0", name="ck_key_spend_not_negative"),)

    api_key_id: str = Field(foreign_key="api_keys.id", primary_key=True, max_length=40)
    period: str = Field(primary_key=True, max_length=20)
    spent_micros: int = Field(default=0, sa_type=sa.BigInteger)


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
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id}")
    return tenant


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


async def revoke_key(session: AsyncSession, key_id: str) -> ApiKey:
    key = await session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        await session.flush()
    return key
