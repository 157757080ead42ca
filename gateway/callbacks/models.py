"""The ``callback_deliveries`` and ``callback_attempts`` tables."""

from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from gateway.db import utcnow


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # given up after the schedule's last attempt


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


class CallbackDelivery(SQLModel, table=True):
    __tablename__ = "callback_deliveries"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed')", name="ck_callback_deliveries_status"
        ),
        sa.Index("ix_callback_deliveries_task", "task_id"),
        sa.Index(
            "ix_callback_deliveries_due",
            "next_attempt_at",
            postgresql_where=sa.text("status = 'pending'"),
        ),
    )

    id: str = Field(primary_key=True, max_length=40)  # the webhook-id
    task_id: str = Field(foreign_key="tasks.id", max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", max_length=40)
    url: str = Field(max_length=2048)
    status: str = Field(default=DeliveryStatus.PENDING.value, max_length=20)
    schedule: str = Field(default="standard", max_length=20)
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default_factory=utcnow, sa_type=_ts())
    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())
    finished_at: datetime | None = Field(default=None, sa_type=_ts())


class CallbackAttempt(SQLModel, table=True):
    __tablename__ = "callback_attempts"
    __table_args__ = (
        sa.UniqueConstraint("delivery_id", "number", name="uq_callback_attempts_number"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=sa.BigInteger)
    delivery_id: str = Field(foreign_key="callback_deliveries.id", max_length=40)
    number: int
    started_at: datetime = Field(sa_type=_ts())
    duration_ms: int
    status_code: int | None = None
    error: str | None = Field(default=None, max_length=500)
    succeeded: bool
