"""Admin routes for prices at run time (under ``/admin``, behind its guard:
``gateway/admin.py``): groups, their prices, exchange rates and the record of changes.

A change is committed with its record and a bump of the version stamp; every gateway
process uses it within ``TOLLGATE_KEY_CACHE_TTL_SECONDS`` (``gateway/prices/book.py``).
``X-Tollgate-Actor`` names who made a change in that record (default ``admin-api``).
"""

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Response, delete, get, patch, post, put
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from gateway.channels.routes import given_fields
from gateway.deps import ServicesDep, UnitOfWorkDep
from gateway.prices import service as prices
from gateway.prices.book import Snapshot, load_snapshot
from gateway.responses import admin_error_responses, json_response

Figure = Annotated[Decimal, msgspec.Meta(description="A decimal number, as a string or a number.")]
Actor = Annotated[
    str | None,
    HeaderParameter(name="X-Tollgate-Actor", description="Who makes the change, for the record."),
]


class NewGroup(msgspec.Struct, forbid_unknown_fields=True):
    """A user group: a multiplier on the catalogue's prices, and a description."""

    name: Annotated[str, msgspec.Meta(description="Letters, digits, '.', '_' and '-'.")]
    multiplier: Figure = Decimal(1)
    description: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class GroupChanges(msgspec.Struct, forbid_unknown_fields=True):
    multiplier: Figure | msgspec.UnsetType = msgspec.UNSET
    description: Annotated[str, msgspec.Meta(max_length=1000)] | msgspec.UnsetType = msgspec.UNSET


class GroupPriceBody(msgspec.Struct, forbid_unknown_fields=True):
    """A group's own price for one model, in credits: the rule and its modifiers."""

    amount: Figure
    rule: Literal["per_call", "per_image", "per_megapixel_step"] | None = None
    by_quality: dict[str, Figure] | None = None
    with_style_references: Figure | None = None
    with_moodboard: Figure | None = None


class RateBody(msgspec.Struct, forbid_unknown_fields=True):
    """Credits per one unit of the currency, in force from ``effective_at`` (default now)."""

    rate: Figure
    effective_at: datetime | None = None
    note: Annotated[str, msgspec.Meta(max_length=1000)] = ""


async def fresh(services: Any) -> Snapshot:
    """The prices as stored now (not this process's cached view): what admin reads show."""
    snapshot: Snapshot = await load_snapshot(services.pg, services.catalog)
    return snapshot


def _actor(value: str | None) -> str:
    return (value or "admin-api").strip()[:200] or "admin-api"


class PricesAdminController(Controller):
    path = "/"

    @get("/groups", summary="List user groups", responses=admin_error_responses(401))
    async def list_groups(self, services: ServicesDep) -> Response[Any]:
        snapshot = await fresh(services)
        return json_response(
            {"data": [prices.group_view(snapshot, name) for name in sorted(snapshot.groups)]}
        )

    @post(
        "/groups",
        summary="Create a user group",
        responses=admin_error_responses(400, 401),
    )
    async def create_group(
        self,
        data: JSONBody[NewGroup],
        services: ServicesDep,
        uow: UnitOfWorkDep,
        actor: Actor = None,
    ) -> Response[Any]:
        created = await prices.create_group(
            uow.session,
            services.catalog,
            data.name,
            data.multiplier,
            data.description,
            _actor(actor),
        )
        return json_response(created, 201)

    @patch(
        "/groups/{group:str}",
        summary="Change a group's multiplier or description",
        responses=admin_error_responses(400, 401, 404),
    )
    async def update_group(
        self,
        group: FromPath[str],
        data: JSONBody[GroupChanges],
        services: ServicesDep,
        uow: UnitOfWorkDep,
        actor: Actor = None,
    ) -> Response[Any]:
        changed = await prices.update_group(
            uow.session, services.catalog, group, given_fields(data), _actor(actor)
        )
        return json_response(changed)

    @get(
        "/groups/{group:str}/prices",
        summary="Every model's effective price for a group, and where it comes from",
        description="`source`: `catalogue` (the list price), `group_multiplier` (the list "
        "price × the group's multiplier) or `group_override` (the group's own price).",
        responses=admin_error_responses(400, 401, 404),
    )
    async def group_prices(self, group: FromPath[str], services: ServicesDep) -> Response[Any]:
        snapshot = await fresh(services)
        return json_response({"group": group, "data": prices.model_prices(snapshot, group)})

    @put(
        "/groups/{group:str}/prices/{model:str}",
        summary="Set a group's own price for a model",
        description="`rule` defaults to the model's list rule. Tasks already submitted "
        "settle at the price they were quoted.",
        responses=admin_error_responses(400, 401, 404),
    )
    async def set_group_price(
        self,
        group: FromPath[str],
        model: FromPath[str],
        data: JSONBody[GroupPriceBody],
        services: ServicesDep,
        uow: UnitOfWorkDep,
        actor: Actor = None,
    ) -> Response[Any]:
        body = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not None}
        entry = services.catalog.model(model)
        if "rule" not in body and entry is not None:
            body["rule"] = entry.price.rule
        saved = await prices.set_group_price(
            uow.session, services.catalog, group, model, body, _actor(actor)
        )
        return json_response(saved)

    @delete(
        "/groups/{group:str}/prices/{model:str}",
        summary="Return a group's price for a model to its default",
        responses=admin_error_responses(400, 401, 404),
    )
    async def delete_group_price(
        self,
        group: FromPath[str],
        model: FromPath[str],
        services: ServicesDep,
        uow: UnitOfWorkDep,
        actor: Actor = None,
    ) -> None:
        await prices.delete_group_price(uow.session, services.catalog, group, model, _actor(actor))

    @get(
        "/price-changes",
        summary="The record of price, group and rate changes, newest first",
        responses=admin_error_responses(400, 401),
    )
    async def price_changes(
        self,
        uow: UnitOfWorkDep,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> Response[Any]:
        return json_response({"data": await prices.list_changes(uow.session, limit)})

    @get(
        "/exchange-rates",
        summary="Exchange rates in force, and their history",
        description="Credits per unit of each upstream currency; the credit currency is 1.",
        responses=admin_error_responses(401),
    )
    async def exchange_rates(self, services: ServicesDep, uow: UnitOfWorkDep) -> Response[Any]:
        return json_response(await prices.rates_view(uow.session, await fresh(services)))

    @put(
        "/exchange-rates/{currency:str}",
        summary="Set a dated exchange rate",
        description="Credits per one unit of `currency` from `effective_at` (default now). "
        "Earlier rates stay in the history; tasks already quoted keep their rate.",
        responses=admin_error_responses(400, 401),
    )
    async def set_rate(
        self,
        currency: FromPath[str],
        data: JSONBody[RateBody],
        services: ServicesDep,
        uow: UnitOfWorkDep,
        actor: Actor = None,
    ) -> Response[Any]:
        saved = await prices.set_rate(
            uow.session,
            services.catalog,
            currency,
            data.rate,
            data.effective_at,
            data.note,
            _actor(actor),
        )
        return json_response(saved)
