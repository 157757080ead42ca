"""tenant suspension and deletion, key expiry, rotation and scope, redemption codes

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 18:30:00

- ``tenants.suspended_at`` (a suspended tenant may read but not submit) and
  ``tenants.deleted_at`` (deleting suspends and revokes every key; the ledger stays).
- ``api_keys.expires_at`` (refused after it), ``api_keys.can_manage_keys`` (the
  scope the tenant's key routes need; existing keys keep full rights) and
  ``previous_key_hash`` / ``previous_expires_at``: a rotated key's old secret, valid
  until the end of its grace period.
- ``redemption_batches`` and ``redemption_codes``: only each code's SHA-256 is stored.
- ``ix_tasks_tenant_created_id``: the tenant's task list, newest first, by keyset
  ``(created_at, id)``; it replaces ``ix_tasks_tenant_created``, a prefix of it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = True) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.add_column("tenants", _ts("suspended_at"))
    op.add_column("tenants", _ts("deleted_at"))
    op.add_column("api_keys", _ts("expires_at"))
    op.add_column(
        "api_keys",
        sa.Column("can_manage_keys", sa.Boolean(), nullable=False, server_default=sa.true()),
    )
    op.add_column("api_keys", sa.Column("previous_key_hash", sa.String(64), nullable=True))
    op.add_column("api_keys", _ts("previous_expires_at"))
    op.create_index("ix_api_keys_previous_key_hash", "api_keys", ["previous_key_hash"], unique=True)

    op.create_table(
        "redemption_batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        _ts("expires_at"),
        sa.Column("note", sa.String(500), nullable=False, server_default=""),
        _ts("created_at", nullable=False),
        sa.CheckConstraint("amount_micros > 0", name="ck_redemption_batches_amount_positive"),
    )
    op.create_table(
        "redemption_codes",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "batch_id", sa.String(40), sa.ForeignKey("redemption_batches.id"), nullable=False
        ),
        sa.Column("code_hash", sa.String(64), nullable=False, unique=True),
        _ts("redeemed_at"),
        sa.Column(
            "redeemed_by_tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=True
        ),
        sa.Column("redeemed_by_key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=True),
    )
    op.create_index("ix_redemption_codes_batch", "redemption_codes", ["batch_id"])

    op.create_index("ix_tasks_tenant_created_id", "tasks", ["tenant_id", "created_at", "id"])
    op.drop_index("ix_tasks_tenant_created", table_name="tasks")


def downgrade() -> None:
    op.create_index("ix_tasks_tenant_created", "tasks", ["tenant_id", "created_at"])
    op.drop_index("ix_tasks_tenant_created_id", table_name="tasks")
    op.drop_index("ix_redemption_codes_batch", table_name="redemption_codes")
    op.drop_table("redemption_codes")
    op.drop_table("redemption_batches")
    op.drop_index("ix_api_keys_previous_key_hash", table_name="api_keys")
    for column in ("previous_expires_at", "previous_key_hash", "can_manage_keys", "expires_at"):
        op.drop_column("api_keys", column)
    op.drop_column("tenants", "deleted_at")
    op.drop_column("tenants", "suspended_at")
