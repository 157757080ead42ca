"""Admin routes for credits (under ``/admin``, behind its guard: ``gateway/admin.py``).

Top-ups, adjustments, balances, usage reports, refunds and the ledger check; the
rules are the ledger's (``gateway/ledger/__init__.py``).
"""

from datetime import date
from typing import Annotated, Any, Literal

from litestar import Controller, Response, get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from gateway.deps import UnitOfWorkDep
from gateway.errors import InvalidRequest
from gateway.ledger import reports
from gateway.ledger import service as ledger
from gateway.ledger.models import EntryKind
from gateway.ledger.schemas import CreditChange, Refund
from gateway.openapi_docs import JsonOrCsvOperation
from gateway.responses import admin_error_responses, json_response
from gateway.tenants.service import get_tenant
from pricing.money import credits_from_micros


class LedgerAdminController(Controller):
    path = "/"

    @post(
        "/tenants/{tenant_id:str}/topup",
        status_code=200,
        summary="Add credits",
        responses=admin_error_responses(400, 401, 404, 409),
    )
    async def topup(
        self, tenant_id: FromPath[str], data: JSONBody[CreditChange], uow: UnitOfWorkDep
    ) -> Response[Any]:
        changed = await ledger.change_credits(uow.session, tenant_id, data, EntryKind.TOPUP)
        return json_response(changed)

    @post(
        "/tenants/{tenant_id:str}/adjust",
        status_code=200,
        summary="Adjust credits up or down, with a reason",
        responses=admin_error_responses(400, 401, 404, 409),
    )
    async def adjust(
        self, tenant_id: FromPath[str], data: JSONBody[CreditChange], uow: UnitOfWorkDep
    ) -> Response[Any]:
        changed = await ledger.change_credits(uow.session, tenant_id, data, EntryKind.ADJUSTMENT)
        return json_response(changed)

    @get(
        "/tenants/{tenant_id:str}/balance",
        summary="Balance, held credits and open holds",
        responses=admin_error_responses(400, 401, 404),
    )
    async def balance(self, tenant_id: FromPath[str], uow: UnitOfWorkDep) -> Response[Any]:
        await get_tenant(uow.session, tenant_id)
        held = await ledger.balance(uow.session, tenant_id)
        return json_response(ledger.balance_json(tenant_id, held))

    @get(
        "/tenants/{tenant_id:str}/usage",
        summary="Usage by model and day: tasks, images, charged, upstream cost, margin",
        description="`format=csv` answers text/csv. Days are UTC; the default is the last 30.",
        operation_class=JsonOrCsvOperation,
        responses=admin_error_responses(400, 401, 404),
    )
    async def usage(
        self,
        tenant_id: FromPath[str],
        uow: UnitOfWorkDep,
        since: FromQuery[date | None] = None,
        until: FromQuery[date | None] = None,
        format: FromQuery[Literal["json", "csv"]] = "json",
    ) -> Response[Any]:
        await get_tenant(uow.session, tenant_id)
        report = await reports.usage(uow.session, tenant_id, since, until)
        if format == "csv":
            return Response(content=reports.usage_csv(report), media_type="text/csv")
        return json_response({"tenant_id": tenant_id, "data": report})

    @get(
        "/usage/tasks",
        summary="Per-task usage and margin of every tenant, for a range of days",
        description="One row per task created from `from` to `to` (UTC days, inclusive; "
        "default the last 30): the quoted price, the charge, refunds and adjustments naming "
        "the task, the net, the upstream cost in credits and in its own currency, and the "
        "margin (net − cost). `format=csv` answers text/csv. At most 100,000 rows: a range "
        "holding more is a 400 naming `from`.",
        operation_class=JsonOrCsvOperation,
        responses=admin_error_responses(400, 401),
    )
    async def task_usage(
        self,
        uow: UnitOfWorkDep,
        from_: Annotated[date | None, QueryParameter(name="from")] = None,
        to: FromQuery[date | None] = None,
        format: FromQuery[Literal["json", "csv"]] = "json",
    ) -> Response[Any]:
        if from_ is not None and to is not None and from_ > to:
            raise InvalidRequest("from", "must not be after `to`")
        export = await reports.task_export(uow.session, from_, to)
        if format == "csv":
            return Response(content=reports.task_export_csv(export), media_type="text/csv")
        return json_response({"data": export})

    @post(
        "/tasks/{task_id:str}/refund",
        status_code=200,
        summary="Refund a task's charge",
        responses=admin_error_responses(400, 401, 404, 409),
    )
    async def refund(
        self, task_id: FromPath[str], data: JSONBody[Refund], uow: UnitOfWorkDep
    ) -> Response[Any]:
        if not data.reason.strip():
            raise InvalidRequest("reason", "a refund needs a reason")
        amount = None if data.amount is None else ledger.parse_amount(data.amount)
        refunded = await ledger.refund(uow.session, task_id, amount, data.reason)
        return json_response({"task_id": task_id, "refunded": credits_from_micros(refunded)})

    @get(
        "/ledger/check",
        summary="Check every balance against the ledger",
        responses=admin_error_responses(401),
    )
    async def ledger_check(self, uow: UnitOfWorkDep) -> Response[Any]:
        problems = await ledger.check(uow.session)
        return json_response({"ok": not problems, "problems": problems})
