"""The operator's routes for redemption codes (under ``/admin``, behind its guard:
``gateway/admin.py``). The codes appear once, in the answer that makes them."""

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, get, post
from litestar.params import JSONBody, QueryParameter

from gateway.deps import UnitOfWorkDep
from gateway.ledger.service import parse_amount
from gateway.redemption import service as redemption
from gateway.responses import admin_error_responses, json_response
from gateway.tenants.routes import aware


class NewCodes(msgspec.Struct, forbid_unknown_fields=True):
    amount: Decimal  # credits each code is worth
    count: Annotated[int, msgspec.Meta(ge=1, le=redemption.MAX_COUNT)] = 1
    expires_at: datetime | None = None
    note: Annotated[str, msgspec.Meta(max_length=500)] = ""


class RedemptionAdminController(Controller):
    path = "/"

    @post(
        "/redemption-codes",
        summary="Make a batch of redemption codes (shown once; only their hashes are kept)",
        responses=admin_error_responses(400, 401),
    )
    async def create_codes(self, data: JSONBody[NewCodes], uow: UnitOfWorkDep) -> Response[Any]:
        batch, codes = await redemption.create_batch(
            uow.session,
            amount_micros=parse_amount(data.amount),
            count=data.count,
            expires_at=aware(data.expires_at, "expires_at"),
            note=data.note,
        )
        return json_response({**redemption.batch_json(batch), "codes": codes}, 201)

    @get(
        "/redemption-codes",
        summary="Batches of redemption codes: which codes were used, by whom, when",
        responses=admin_error_responses(400, 401),
    )
    async def list_codes(
        self, uow: UnitOfWorkDep, limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100
    ) -> Response[Any]:
        return json_response({"data": await redemption.list_batches(uow.session, limit)})
