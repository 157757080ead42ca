"""Every table, imported in one place so Alembic sees the whole metadata."""

from sqlmodel import SQLModel

from gateway.callbacks.models import CallbackAttempt, CallbackDelivery
from gateway.channels.models import Channel
from gateway.console.models import ConsoleUser, Invitation, TenantConsoleSettings
from gateway.ledger.models import LedgerEntry
from gateway.redemption.models import RedemptionBatch, RedemptionCode
from gateway.tasks.models import IdempotencyKey, Task
from gateway.tenants.models import ApiKey, KeySpend, Tenant

metadata = SQLModel.metadata

__all__ = [
    "ApiKey",
    "CallbackAttempt",
    "CallbackDelivery",
    "Channel",
    "ConsoleUser",
    "IdempotencyKey",
    "Invitation",
    "KeySpend",
    "LedgerEntry",
    "RedemptionBatch",
    "RedemptionCode",
    "Task",
    "Tenant",
    "TenantConsoleSettings",
    "metadata",
]
