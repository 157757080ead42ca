"""The tenant's self-service routes under ``/v1`` (rules: ``gateway/account``), thin: each
calls ``gateway/account/service.py``, ``gateway/tenants/keys.py`` or
``gateway/redemption/service.py``.
"""

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import Provide
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from gateway.account import service as account
from gateway.deps import PrincipalDep, ServicesDep, UnitOfWorkDep, provide_principal, provide_uow
from gateway.errors import InvalidRequest
from gateway.openapi_docs import JsonOrCsvOperation
from gateway.redemption import service as redemption
from gateway.responses import error_responses, json_response
from gateway.tasks.service import render_task
from gateway.tenants import keys
from gateway.tenants.routes import Label, aware
from gateway.tenants.service import key_json
from pricing.money import MoneyError, micros_from_text

Models = Annotated[list[str], msgspec.Meta(max_length=1000)]


class Redemption(msgspec.Struct, forbid_unknown_fields=True):
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=redemption.MAX_CODE_CHARS)]


class NewOwnKey(msgspec.Struct, forbid_unknown_fields=True):
    name: Label = ""
    # At most this key's own models, budgets and expiry (left out: this key's).
    allowed_models: Models | None = None
    budget_total: Decimal | None = None
    budget_daily: Decimal | None = None
    budget_monthly: Decimal | None = None
    expires_at: datetime | None = None
    can_manage_keys: bool = False


def budget_micros(field: str, value: Decimal | None) -> int | None:
    """Credits as given → micro-credits, not negative, or a 400 naming the field."""
    if value is None:
        return None
    try:
        return micros_from_text(str(value))
    except MoneyError as exc:
        raise InvalidRequest(field, str(exc)) from None


def wants_csv(request: Request[Any, Any, Any], format: str) -> bool:
    return format == "csv" or "text/csv" in request.headers.get("accept", "")


class AccountController(Controller):
    path = "/v1"
    tags = ["account"]
    dependencies = {"principal": Provide(provide_principal), "uow": Provide(provide_uow)}
    security = [{"bearerAuth": []}]

    @get(
        "/account",
        summary="The caller's tenant: group, balance, held, available, limits, budgets",
        responses=error_responses(401, 429, 503),
    )
    async def get_account(
        self, principal: PrincipalDep, services: ServicesDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        return json_response(await account.account(uow.session, services.settings, principal))

    @post(
        "/account/redeem",
        status_code=200,
        summary="Redeem a code: its credits are added to the balance",
        description="An unknown code answers 404 `redemption_code_not_found`, a used one 409 "
        "`redemption_code_used`, an expired one 410 `redemption_code_expired`; none credits "
        "anything. Attempts are limited per key (429 with `Retry-After`).",
        responses=error_responses(400, 401, 404, 409, 410, 429, 503),
    )
    async def redeem(
        self,
        data: JSONBody[Redemption],
        principal: PrincipalDep,
        services: ServicesDep,
        uow: UnitOfWorkDep,
    ) -> Response[Any]:
        await redemption.check_attempt_rate(
            services.quick_redis,
            f"key:{principal.key_id}",
            services.settings.redeem_rate_limit_per_minute,
        )
        redeemed = await redemption.redeem(
            uow.session, principal.tenant_id, data.code, key_id=principal.key_id
        )
        return json_response(redeemed)

    @get(
        "/usage",
        summary="Usage per UTC day and model: tasks, images, credits charged, refunded, net",
        description="The last 30 days unless `since`/`until` (UTC days, both included) say. "
        "CSV with `Accept: text/csv` or `format=csv`.",
        operation_class=JsonOrCsvOperation,
        responses=error_responses(400, 401, 429, 503),
    )
    async def usage(
        self,
        request: Request[Any, Any, Any],
        principal: PrincipalDep,
        uow: UnitOfWorkDep,
        since: FromQuery[date | None] = None,
        until: FromQuery[date | None] = None,
        format: FromQuery[Literal["json", "csv"]] = "json",
    ) -> Response[Any]:
        rows = await account.usage(uow.session, principal.tenant_id, since, until)
        if wants_csv(request, format):
            return Response(content=account.usage_csv(rows), media_type="text/csv")
        return json_response({"data": rows})

    @get(
        "/tasks",
        summary="The tenant's tasks, newest first",
        description="Filters: `status`, `model`, `since`/`until` (UTC days, both included). "
        "`next_cursor` fetches the next page (absent on the last).",
        responses=error_responses(400, 401, 429, 503),
    )
    async def list_tasks(
        self,
        principal: PrincipalDep,
        services: ServicesDep,
        uow: UnitOfWorkDep,
        status: FromQuery[str | None] = None,
        model: FromQuery[str | None] = None,
        since: FromQuery[date | None] = None,
        until: FromQuery[date | None] = None,
        cursor: FromQuery[str | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
    ) -> Response[Any]:
        filters = account.TaskFilter(status=status, model=model, since=since, until=until)
        page, following = await account.list_tasks(
            uow.session, principal.tenant_id, filters, limit=limit, cursor=cursor
        )
        data = [render_task(task, services.signer) for task in page]
        return json_response({"data": data, "next_cursor": following})

    @get(
        "/keys",
        summary="The tenant's keys (never their secrets)",
        description="Needs a key with the `can_manage_keys` scope (403 otherwise).",
        responses=error_responses(401, 403, 429, 503),
    )
    async def list_keys(self, principal: PrincipalDep, uow: UnitOfWorkDep) -> Response[Any]:
        found = await keys.list_own_keys(uow.session, principal)
        return json_response({"data": [key_json(k) for k in found]})

    @post(
        "/keys",
        summary="Create a key for the tenant (its secret is shown once)",
        description="Never wider than the calling key: models among its own, budgets at "
        "most its own, expiry no later than its own (left out: the caller's). Needs "
        "`can_manage_keys`; the new key has that scope only when asked for.",
        responses=error_responses(400, 401, 403, 409, 429, 503),
    )
    async def create_key(
        self,
        data: JSONBody[NewOwnKey],
        principal: PrincipalDep,
        services: ServicesDep,
        uow: UnitOfWorkDep,
    ) -> Response[Any]:
        budgets = {
            period: budget_micros(f"budget_{period}", value)
            for period, value in (
                ("total", data.budget_total),
                ("daily", data.budget_daily),
                ("monthly", data.budget_monthly),
            )
        }
        wanted = keys.OwnKeyRequest(
            name=data.name,
            allowed_models=data.allowed_models,
            budgets=budgets,
            expires_at=aware(data.expires_at, "expires_at"),
            can_manage_keys=data.can_manage_keys,
        )
        issued = await keys.create_own_key(uow.session, services.catalog, principal, wanted)
        return json_response({**key_json(issued.key), "key": issued.secret}, 201)

    @post(
        "/keys/{key_id:str}/revoke",
        status_code=200,
        summary="Revoke one of the tenant's keys",
        description="Refused by every gateway within `TOLLGATE_KEY_CACHE_TTL_SECONDS`.",
        responses=error_responses(400, 401, 403, 404, 429, 503),
    )
    async def revoke_key(
        self, key_id: FromPath[str], principal: PrincipalDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        return json_response(key_json(await keys.revoke_own_key(uow.session, principal, key_id)))
