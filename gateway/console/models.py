"""The console's tables: its users, their invitations, and each tenant's console settings."""

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from gateway.db import utcnow

ROLES = ("operator", "owner", "member")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


class ConsoleUser(SQLModel, table=True):
    """A person who logs in to the console: an operator, or a tenant's owner or member."""

    __tablename__ = "console_users"
    __table_args__ = (
        sa.CheckConstraint("role IN ('operator', 'owner', 'member')", name="ck_console_role"),
        sa.CheckConstraint(
            "(role = 'operator') = (tenant_id IS NULL)", name="ck_console_user_tenant"
        ),
        sa.Index("ix_console_users_tenant", "tenant_id"),
    )

    id: str = Field(primary_key=True, max_length=40)
    email: str = Field(sa_column_kwargs={"unique": True}, max_length=320)
    password_hash: str = Field(max_length=200)
    role: str = Field(max_length=20)
    tenant_id: str | None = Field(default=None, foreign_key="tenants.id", max_length=40)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())
    disabled_at: datetime | None = Field(default=None, sa_type=_ts())


class Invitation(SQLModel, table=True):
    """A one-time link to create an account; only its token's hash is stored."""

    __tablename__ = "console_invitations"

    token_hash: str = Field(primary_key=True, max_length=64)
    email: str = Field(max_length=320)
    role: str = Field(max_length=20)
    tenant_id: str | None = Field(default=None, foreign_key="tenants.id", max_length=40)
    invited_by: str = Field(foreign_key="console_users.id", max_length=40)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_ts())
    expires_at: datetime = Field(sa_type=_ts())
    used_at: datetime | None = Field(default=None, sa_type=_ts())


class TenantConsoleSettings(SQLModel, table=True):
    """What a tenant's owner decides for its members (a missing row: the defaults)."""

    __tablename__ = "console_tenant_settings"

    tenant_id: str = Field(foreign_key="tenants.id", primary_key=True, max_length=40)
    members_manage_keys: bool = True
