"""The ``redemption_batches`` and ``redemption_codes`` tables (rules: ``gateway/redemption``)."""

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from gateway.db import utcnow


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


class RedemptionBatch(SQLModel, table=True):
    __tablename__ = "redemption_batches"
    __table_args__ = (
        sa.CheckConstraint("amount_micros > 0", name="ck_redemption_batches_amount_positive"),
    )

    id: str = Field(primary_key=True, max_length=40)
    amount_micros: int = Field(sa_type=sa.BigInteger)  # what each code of the batch is worth
    count: int
    expires_at: datetime | None = Field(default=None, sa_type=_ts())
    note: str = Field(default="", max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())


class RedemptionCode(SQLModel, table=True):
    __tablename__ = "redemption_codes"
    __table_args__ = (sa.Index("ix_redemption_codes_batch", "batch_id"),)

    id: str = Field(primary_key=True, max_length=40)
    batch_id: str = Field(foreign_key="redemption_batches.id", max_length=40)
    code_hash: str = Field(sa_column_kwargs={"unique": True}, max_length=64)
    redeemed_at: datetime | None = Field(default=None, sa_type=_ts())
    redeemed_by_tenant_id: str | None = Field(default=None, foreign_key="tenants.id", max_length=40)
    redeemed_by_key_id: str | None = Field(default=None, foreign_key="api_keys.id", max_length=40)
