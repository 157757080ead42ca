"""when retention deleted each task's result files

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 15:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing; every finished task starts as
    # "files maybe present", and the first retention run works through the backlog.
    op.add_column(
        "tasks", sa.Column("results_deleted_at", sa.DateTime(timezone=True), nullable=True)
    )
    # Retention's scan: finished tasks whose files are still there, by when they may go.
    op.create_index(
        "ix_tasks_retention",
        "tasks",
        [sa.text("COALESCE(results_expire_at, finished_at)")],
        postgresql_where=sa.text("finished_at IS NOT NULL AND results_deleted_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_retention", table_name="tasks")
    op.drop_column("tasks", "results_deleted_at")
