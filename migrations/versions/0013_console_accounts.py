"""console accounts: operator and tenant users, invitations, per-tenant console settings

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 18:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column[sa.DateTime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "console_users",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("email", sa.String(320), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=True),
        _ts("created_at"),
        _ts("disabled_at", nullable=True),
        sa.CheckConstraint("role IN ('operator', 'owner', 'member')", name="ck_console_role"),
        # An operator belongs to no tenant; an owner or member to exactly one.
        sa.CheckConstraint(
            "(role = 'operator') = (tenant_id IS NULL)", name="ck_console_user_tenant"
        ),
    )
    op.create_index("ix_console_users_tenant", "console_users", ["tenant_id"])
    op.create_table(
        "console_invitations",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=True),
        sa.Column("invited_by", sa.String(40), sa.ForeignKey("console_users.id"), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("used_at", nullable=True),
    )
    op.create_table(
        "console_tenant_settings",
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("members_manage_keys", sa.Boolean, nullable=False, server_default="true"),
    )


def downgrade() -> None:
    op.drop_table("console_tenant_settings")
    op.drop_table("console_invitations")
    op.drop_index("ix_console_users_tenant", table_name="console_users")
    op.drop_table("console_users")
