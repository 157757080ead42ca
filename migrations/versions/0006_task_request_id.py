"""the request id that submitted each task

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing, and older tasks simply have none.
    op.add_column(
        "tasks",
        sa.Column("request_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("tasks", "request_id")
