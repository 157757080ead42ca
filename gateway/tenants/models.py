"""The ``tenants``, ``api_keys`` and ``key_spend`` tables (rules: ``gateway/tenants``)."""

import base64
import hashlib
import secrets
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from gateway.crypto import WEBHOOK_SECRET, Sealed
from gateway.db import utcnow

KEY_PREFIX = "tg_"
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
    # Limits (None: the settings' default; 0: no limit). See gateway/limits/service.py.
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
    # Suspended: reads work, submits are refused (403 tenant_suspended). Deleted: suspended
    # for good and every key revoked; the ledger stays.
    suspended_at: datetime | None = Field(default=None, sa_type=_ts())
    deleted_at: datetime | None = Field(default=None, sa_type=_ts())


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
    # Refused (401 key_expired) from this instant on; None: never expires.
    expires_at: datetime | None = Field(default=None, sa_type=_ts())
    # The scope the tenant's own key routes (/v1/keys) need.
    can_manage_keys: bool = Field(default=True, sa_column_kwargs={"server_default": sa.true()})
    # After a rotation: the old secret's hash, valid until previous_expires_at.
    previous_key_hash: str | None = Field(
        default=None, max_length=64, sa_column_kwargs={"unique": True}
    )
    previous_expires_at: datetime | None = Field(default=None, sa_type=_ts())


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeySpend(SQLModel, table=True):
    """What a key has reserved or spent per period: ``total``, ``day:<date>``, ``month:<month>``."""

    __tablename__ = "key_spend"
    __table_args__ = (sa.CheckConstraint("spent_micros >= 0", name="ck_key_spend_not_negative"),)

    api_key_id: str = Field(foreign_key="api_keys.id", primary_key=True, max_length=40)
    period: str = Field(primary_key=True, max_length=20)
    spent_micros: int = Field(default=0, sa_type=sa.BigInteger)
