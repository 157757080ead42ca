"""Every table, imported in one place so Alembic sees the whole metadata."""

from sqlmodel import SQLModel

from gateway.tasks.models import Task
from gateway.tenants import ApiKey, Tenant

metadata = SQLModel.metadata

__all__ = ["ApiKey", "Task", "Tenant", "metadata"]
