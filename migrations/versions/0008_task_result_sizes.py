"""each result image's width and height, as read from the image itself

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 15:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing; tasks completed before have none.
    op.add_column("tasks", sa.Column("result_sizes", JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "result_sizes")
