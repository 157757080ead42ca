"""Tables of run-time pricing: groups, group prices, exchange rates, changes, the version.

Decimal figures are kept as decimal strings (read exactly by ``pricing.money``),
never as floats.
"""

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from gateway.db import utcnow


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


class PriceGroup(SQLModel, table=True):
    """A user group set at run time; a catalogue group of the same name is overridden."""

    __tablename__ = "price_groups"

    name: str = Field(primary_key=True, max_length=100)
    multiplier: str = Field(max_length=40)
    description: str = Field(default="", max_length=1000)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())
    updated_at: datetime = Field(default_factory=utcnow, sa_type=_ts())


class GroupPrice(SQLModel, table=True):
    """A group's own price for one model (a ``pricing.catalog.Price``, as JSON)."""

    __tablename__ = "group_prices"

    group_name: str = Field(primary_key=True, max_length=100)
    model: str = Field(primary_key=True, max_length=100)
    price: dict[str, Any] = Field(sa_type=JSONB)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=_ts())


class ExchangeRate(SQLModel, table=True):
    """Credits per unit of ``currency`` from ``effective_at`` on; rows are never changed."""

    __tablename__ = "exchange_rates"
    __table_args__ = (sa.Index("ix_exchange_rates_currency", "currency", "effective_at"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=sa.BigInteger)
    currency: str = Field(max_length=8)
    rate: str = Field(max_length=40)
    effective_at: datetime = Field(sa_type=_ts())
    set_by: str = Field(default="", max_length=200)
    note: str = Field(default="", max_length=1000)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())


class PriceChange(SQLModel, table=True):
    """One change of a group, a group price or a rate: who, when, old and new."""

    __tablename__ = "price_changes"
    __table_args__ = (sa.Index("ix_price_changes_changed_at", "changed_at"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=sa.BigInteger)
    changed_at: datetime = Field(default_factory=utcnow, sa_type=_ts())
    actor: str = Field(max_length=200)
    kind: str = Field(max_length=30)  # group, group_price, exchange_rate
    subject: str = Field(max_length=300)  # "vip", "vip/flux-1-pro", "CNY"
    old: dict[str, Any] | None = Field(default=None, sa_type=JSONB)
    new: dict[str, Any] | None = Field(default=None, sa_type=JSONB)


class PricingVersion(SQLModel, table=True):
    """One row: bumped by every change, read by each process at most once per TTL."""

    __tablename__ = "pricing_version"

    id: int = Field(default=1, primary_key=True)
    version: int = Field(default=0, sa_type=sa.BigInteger)
