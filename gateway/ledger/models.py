"""The ``ledger_entries`` table."""

from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from gateway.db import utcnow


class EntryKind(StrEnum):
    TOPUP = "topup"
    HOLD = "hold"
    CAPTURE = "capture"
    RELEASE = "release"
    REFUND = "refund"
    ADJUSTMENT = "adjustment"


class LedgerEntry(SQLModel, table=True):
    __tablename__ = "ledger_entries"
    __table_args__ = (
        sa.CheckConstraint(
            "kind IN ('topup', 'hold', 'capture', 'release', 'refund', 'adjustment')",
            name="ck_ledger_kind",
        ),
        # Only an adjustment may be negative; a capture may be zero (a free result).
        sa.CheckConstraint(
            "kind = 'adjustment' OR amount_micros >= 0", name="ck_ledger_amount_sign"
        ),
        sa.CheckConstraint(
            "kind NOT IN ('hold', 'capture', 'release') OR task_id IS NOT NULL",
            name="ck_ledger_task_moves_name_a_task",
        ),
        sa.Index("ix_ledger_tenant_created", "tenant_id", "created_at"),
        sa.Index("ix_ledger_task", "task_id"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=sa.BigInteger)
    tenant_id: str = Field(foreign_key="tenants.id", max_length=40)
    task_id: str | None = Field(default=None, foreign_key="tasks.id", max_length=64)
    kind: str = Field(max_length=20)
    amount_micros: int = Field(sa_type=sa.BigInteger)
    # For a capture: the hold it closes (the rest of the hold is freed with it).
    hold_micros: int | None = Field(default=None, sa_type=sa.BigInteger)
    idempotency_key: str = Field(sa_column_kwargs={"unique": True}, max_length=200)
    reason: str = Field(default="", max_length=500)
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
