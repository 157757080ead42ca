"""The ``tasks`` table."""

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from gateway.db import utcnow


class TaskStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
OPEN_STATES = (TaskStatus.PENDING.value, TaskStatus.PROCESSING.value)


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


class IdempotencyKey(SQLModel, table=True):
    """An ``Idempotency-Key`` a tenant sent, the request it came with and its task."""

    __tablename__ = "idempotency_keys"

    tenant_id: str = Field(foreign_key="tenants.id", primary_key=True, max_length=40)
    key: str = Field(primary_key=True, max_length=255)
    request_hash: str = Field(max_length=64)
    # Deferred: the key is claimed first in the submit transaction, then the task is inserted.
    task_id: str = Field(
        sa_column=sa.Column(
            sa.String(64),
            sa.ForeignKey("tasks.id", deferrable=True, initially="DEFERRED"),
            nullable=False,
        )
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())


class Task(SQLModel, table=True):
    __tablename__ = "tasks"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')",
            name="ck_tasks_status",
        ),
        sa.CheckConstraint("progress BETWEEN 0 AND 100", name="ck_tasks_progress"),
        # A tenant's tasks newest first, by keyset (created_at, id): GET /v1/tasks.
        sa.Index("ix_tasks_tenant_created_id", "tenant_id", "created_at", "id"),
        # The reconciler's scan: only open tasks are indexed.
        sa.Index(
            "ix_tasks_open",
            "status",
            "created_at",
            postgresql_where=sa.text("status IN ('pending', 'processing')"),
        ),
        # Retention's scan (workers/retention.py): finished tasks whose files remain.
        sa.Index(
            "ix_tasks_retention",
            sa.text("COALESCE(results_expire_at, finished_at)"),
            postgresql_where=sa.text("finished_at IS NOT NULL AND results_deleted_at IS NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", max_length=40)
    api_key_id: str = Field(foreign_key="api_keys.id", max_length=40)
    model: str = Field(max_length=100)
    provider: str = Field(max_length=50)
    status: str = Field(default=TaskStatus.PENDING.value, max_length=20)
    progress: int = 0
    # The validated request (pricing.request.ImageRequest.to_json) and the quote
    # it was reserved with; settlement uses this quote, never a fresh one.
    request: dict[str, Any] = Field(sa_type=JSONB)
    quote: dict[str, Any] = Field(sa_type=JSONB)
    billing_rule: str = Field(max_length=30)
    user_group: str = Field(max_length=100)
    credits_reserved_micros: int = Field(default=0, sa_type=sa.BigInteger)
    credits_charged_micros: int | None = Field(default=None, sa_type=sa.BigInteger)
    upstream_cost_micros: int | None = Field(default=None, sa_type=sa.BigInteger)
    # The same cost in the upstream's own currency (exact decimal text; None: in credits).
    upstream_cost_amount: str | None = Field(default=None, max_length=200)
    upstream_cost_currency: str | None = Field(default=None, max_length=8)
    images_delivered: int | None = None
    estimated_seconds: int = 0
    can_cancel: bool = False
    callback_url: str | None = Field(default=None, max_length=2048)
    # Which front door the task came through: "unified" (seeds/002) or "krea" (seeds/001);
    # it decides the shape of the task in GET answers and in its callback.
    api: str = Field(default="unified", max_length=20)

    attempt: int = 0
    lease_expires_at: datetime | None = Field(default=None, sa_type=_ts())
    # The channel running the task's upstream job and the job's id there, recorded
    # together so a resumed attempt polls the same job on the same channel.
    channel_id: str | None = Field(default=None, max_length=40)
    upstream_job_id: str | None = Field(default=None, max_length=2048)
    results: list[str] | None = Field(default=None, sa_type=JSONB)
    # Each result's [width, height], read from the image itself, in the order of results.
    result_sizes: list[list[int]] | None = Field(default=None, sa_type=JSONB)
    results_expire_at: datetime | None = Field(default=None, sa_type=_ts())
    # Set by retention once the task's files are deleted; its links answer 410 by then.
    results_deleted_at: datetime | None = Field(default=None, sa_type=_ts())
    error_code: str | None = Field(default=None, max_length=50)
    error_message: str | None = Field(default=None, max_length=1000)
    # The id of the HTTP request that submitted the task (X-Request-ID), for the logs.
    request_id: str | None = Field(default=None, max_length=100)

    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())
    started_at: datetime | None = Field(default=None, sa_type=_ts())
    finished_at: datetime | None = Field(default=None, sa_type=_ts())
