"""What an operator sends to move credits: amounts in credits, as exact decimals."""

from decimal import Decimal
from typing import Annotated

import msgspec

Reason = Annotated[str, msgspec.Meta(max_length=500)]


class CreditChange(msgspec.Struct, forbid_unknown_fields=True):
    """A top-up (positive) or an adjustment (signed); amounts in credits, exact decimals."""

    amount: Decimal
    reason: Reason = ""
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=120)] | None = None
    # An adjustment may name one of the tenant's tasks: the usage report and the
    # per-task export count it in the task's `adjusted` column.
    task_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


class Refund(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason
    amount: Decimal | None = None
