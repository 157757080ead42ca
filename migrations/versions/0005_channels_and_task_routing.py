"""channels, and the channel and front door of each task

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "channels",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("adapter", sqlmodel.sql.sqltypes.AutoString(length=30), nullable=False),
        sa.Column("base_url", sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=False),
        sa.Column("api_key", sqlmodel.sql.sqltypes.AutoString(length=4096), nullable=False),
        sa.Column("models", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("weight BETWEEN 1 AND 1000", name="ck_channels_weight"),
        sa.CheckConstraint("max_concurrency >= 1", name="ck_channels_max_concurrency"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.add_column(
        "tasks",
        sa.Column(
            "api",
            sqlmodel.sql.sqltypes.AutoString(length=20),
            nullable=False,
            server_default="unified",
        ),
    )
    op.alter_column("tasks", "api", server_default=None)
    op.add_column(
        "tasks", sa.Column("channel_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True)
    )
    op.alter_column(
        "tasks",
        "upstream_job_id",
        type_=sqlmodel.sql.sqltypes.AutoString(length=2048),
        existing_type=sqlmodel.sql.sqltypes.AutoString(length=200),
        existing_nullable=True,
    )


def downgrade() -> None:
    op.alter_column(
        "tasks",
        "upstream_job_id",
        type_=sqlmodel.sql.sqltypes.AutoString(length=200),
        existing_type=sqlmodel.sql.sqltypes.AutoString(length=2048),
        existing_nullable=True,
    )
    op.drop_column("tasks", "channel_id")
    op.drop_column("tasks", "api")
    op.drop_table("channels")
