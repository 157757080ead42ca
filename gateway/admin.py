"""The operator's API under ``/admin``, guarded by ``TOLLGATE_ADMIN_TOKEN``.

Tenants, their keys (a key's secret appears once, in the response that issues
it), channels (an upstream key is written, never read back) and a view of
tasks. The CLI (``gateway/cli.py``) calls the same services.
"""

import uuid
from datetime import date
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Response, delete, get, patch, post
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from gateway.callbacks import service as callbacks
from gateway.callbacks.routes import redeliver
from gateway.channels import service as channels
from gateway.channels.models import ADAPTER_NAMES, Channel
from gateway.deps import AdminDep, ServicesDep, UnitOfWorkDep, provide_admin, provide_uow
from gateway.errors import ErrorResponse, InvalidRequest, NotFound
from gateway.ledger import reports
from gateway.ledger import service as ledger
from gateway.ledger.models import EntryKind
from gateway.limit_settings import (
    KeyLimits,
    TenantLimits,
    key_limits_json,
    set_key_limits,
    set_tenant_limits,
    tenant_limits_json,
)
from gateway.responses import error_responses, json_response
from gateway.tasks.models import Task
from gateway.tasks.service import list_tasks, task_summary
from gateway.tenants import (
    ApiKey,
    Tenant,
    create_tenant,
    get_tenant,
    issue_key,
    list_keys,
    list_tenants,
    revoke_key,
)
from pricing.money import MoneyError, credits_from_micros, micros_from_signed_text

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Group = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")]
Label = Annotated[str, msgspec.Meta(max_length=200)]
Reason = Annotated[str, msgspec.Meta(max_length=500)]


class NewTenant(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    user_group: Group = "default"


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    name: Label = ""


class CreditChange(msgspec.Struct, forbid_unknown_fields=True):
    """A top-up (positive) or an adjustment (signed); amounts in credits, exact decimals."""

    amount: Decimal
    reason: Reason = ""
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=120)] | None = None


class CallbackSchedule(msgspec.Struct, forbid_unknown_fields=True):
    """``standard``: retries after 1, 2, 4 s. ``extended``: then hourly for a day."""

    schedule: Literal["standard", "extended"]


class Refund(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason
    amount: Decimal | None = None


# Channels. The structs give the body's shape (types, required fields, defaults)
# for decoding and for the OpenAPI document; ranges, URL rules and catalogue
# model ids are checked by gateway.channels.service, which the CLI uses too.
# Either way a 400's message starts with the field's name. No struct or view
# carries a key back out.

_DEFAULT = Channel.model_fields


ChannelName = Annotated[str, msgspec.Meta(description="Letters, digits, '.', '_' and '-'; unique.")]
AdapterName = Annotated[
    str, msgspec.Meta(description="The upstream's wire protocol: " + ", ".join(ADAPTER_NAMES))
]
BaseUrl = Annotated[str, msgspec.Meta(description="The upstream API's http(s) URL.")]
UpstreamKey = Annotated[
    str, msgspec.Meta(description="The upstream key: stored, used, never returned.")
]
ServedModels = Annotated[
    dict[str, str | None],
    msgspec.Meta(
        description="Catalogue model id -> the upstream's id for it, or null for the "
        "catalogue's `upstream_model`."
    ),
]
Priority = Annotated[int, msgspec.Meta(description="-1000..1000; higher is tried first.")]
Weight = Annotated[
    int, msgspec.Meta(description="1..1000; the share of tasks among equal priorities.")
]
MaxConcurrency = Annotated[
    int, msgspec.Meta(description="Upstream jobs at once on this account, all workers together.")
]
Enabled = Annotated[bool, msgspec.Meta(description="Whether tasks are routed to it.")]


class NewChannel(msgspec.Struct, forbid_unknown_fields=True):
    """An upstream account: its adapter (wire protocol), where to call it, and its key."""

    name: ChannelName
    adapter: AdapterName
    base_url: BaseUrl
    api_key: UpstreamKey
    models: ServedModels
    priority: Priority = _DEFAULT["priority"].default
    weight: Weight = _DEFAULT["weight"].default
    max_concurrency: MaxConcurrency = _DEFAULT["max_concurrency"].default
    enabled: Enabled = _DEFAULT["enabled"].default


class ChannelChanges(msgspec.Struct, forbid_unknown_fields=True):
    """The fields to change; those left out stay. ``api_key`` replaces the key."""

    name: ChannelName | msgspec.UnsetType = msgspec.UNSET
    adapter: AdapterName | msgspec.UnsetType = msgspec.UNSET
    base_url: BaseUrl | msgspec.UnsetType = msgspec.UNSET
    api_key: UpstreamKey | msgspec.UnsetType = msgspec.UNSET
    models: ServedModels | msgspec.UnsetType = msgspec.UNSET
    priority: Priority | msgspec.UnsetType = msgspec.UNSET
    weight: Weight | msgspec.UnsetType = msgspec.UNSET
    max_concurrency: MaxConcurrency | msgspec.UnsetType = msgspec.UNSET
    enabled: Enabled | msgspec.UnsetType = msgspec.UNSET


class ChannelView(msgspec.Struct):
    """A channel as the API shows it (``channel_view``): no key, only whether one is set."""

    id: str
    name: str
    adapter: str
    base_url: str
    api_key_set: bool
    models: dict[str, str | None]
    priority: int
    weight: int
    max_concurrency: int
    enabled: bool
    created_at: str
    updated_at: str


class ChannelList(msgspec.Struct):
    data: list[ChannelView]


# error_responses' own 409 speaks of Idempotency-Keys.
_NAME_TAKEN = {
    409: ResponseSpec(
        data_container=ErrorResponse,
        description="A channel of that name exists",
        generate_examples=False,
    )
}


def given_fields(data: msgspec.Struct) -> dict[str, Any]:
    """The fields of a decoded body that were sent."""
    return {
        name: value
        for name in data.__struct_fields__
        if (value := getattr(data, name)) is not msgspec.UNSET
    }


def parse_amount(value: Decimal, field: str = "amount") -> int:
    """Credits as given by a person → micro-credits, exactly, or a 400 naming the field."""
    try:
        return micros_from_signed_text(str(value))
    except MoneyError as exc:
        raise InvalidRequest(field, str(exc)) from None


def balance_json(tenant_id: str, held: ledger.Balance) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "balance": credits_from_micros(held.balance_micros),
        "held": credits_from_micros(held.held_micros),
        "available": credits_from_micros(held.available_micros),
        "balance_micros": held.balance_micros,
        "held_micros": held.held_micros,
        "available_micros": held.available_micros,
        "open_holds": held.open_holds,
    }


async def change_credits(
    session: Any, tenant_id: str, data: CreditChange, kind: EntryKind
) -> dict[str, Any]:
    """A top-up or adjustment, then the balance after it (shared by the API and the CLI)."""
    await get_tenant(session, tenant_id)
    amount = parse_amount(data.amount)
    if kind == EntryKind.ADJUSTMENT and not data.reason.strip():
        raise InvalidRequest("reason", "an adjustment needs a reason")
    # An operator's key is scoped to the tenant and the kind of move, so it can
    # neither collide with another tenant's nor with the system's hold:/settle: keys.
    if data.idempotency_key is not None and not 0 < len(data.idempotency_key) <= 120:
        raise InvalidRequest("idempotency_key", "must be 1 to 120 characters")
    key = f"op:{tenant_id}:{kind.value}:{data.idempotency_key or uuid.uuid4()}"
    applied = await ledger.credit(
        session, tenant_id, amount, kind=kind, idempotency_key=key, reason=data.reason
    )
    result = balance_json(tenant_id, await ledger.balance(session, tenant_id))
    result["applied"] = applied
    return result


def tenant_json(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "name": tenant.name,
        "user_group": tenant.user_group,
        "balance": credits_from_micros(tenant.balance_micros),
        "held": credits_from_micros(tenant.held_micros),
        "created_at": tenant.created_at.isoformat(),
    }


def key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "tenant_id": key.tenant_id,
        "name": key.name,
        "prefix": key.display_prefix,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


class AdminController(Controller):
    path = "/admin"
    tags = ["admin"]
    dependencies = {"admin": Provide(provide_admin), "uow": Provide(provide_uow)}
    security = [{"adminAuth": []}]

    @post("/tenants", summary="Create a tenant")
    async def create_tenant(
        self, data: JSONBody[NewTenant], admin: AdminDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        tenant = await create_tenant(uow.session, name=data.name, user_group=data.user_group)
        return json_response(tenant_json(tenant), 201)

    @get("/tenants", summary="List tenants")
    async def list_tenants(self, admin: AdminDep, uow: UnitOfWorkDep) -> Response[Any]:
        return json_response({"data": [tenant_json(t) for t in await list_tenants(uow.session)]})

    @post("/tenants/{tenant_id:str}/keys", summary="Issue an API key (its secret is shown once)")
    async def issue_key(
        self,
        tenant_id: FromPath[str],
        admin: AdminDep,
        uow: UnitOfWorkDep,
        data: JSONBody[NewKey | None] = None,
    ) -> Response[Any]:
        tenant = await get_tenant(uow.session, tenant_id)
        issued = await issue_key(uow.session, tenant, name=data.name if data else "")
        return json_response({**key_json(issued.key), "key": issued.secret}, 201)

    @get("/tenants/{tenant_id:str}/keys", summary="List a tenant's keys")
    async def list_keys(
        self, tenant_id: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        await get_tenant(uow.session, tenant_id)
        return json_response(
            {"data": [key_json(k) for k in await list_keys(uow.session, tenant_id)]}
        )

    @post("/keys/{key_id:str}/revoke", status_code=200, summary="Revoke an API key")
    async def revoke_key(
        self, key_id: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        return json_response(key_json(await revoke_key(uow.session, key_id)))

    @post("/tenants/{tenant_id:str}/topup", status_code=200, summary="Add credits")
    async def topup(
        self,
        tenant_id: FromPath[str],
        data: JSONBody[CreditChange],
        admin: AdminDep,
        uow: UnitOfWorkDep,
    ) -> Response[Any]:
        return json_response(await change_credits(uow.session, tenant_id, data, EntryKind.TOPUP))

    @post(
        "/tenants/{tenant_id:str}/adjust",
        status_code=200,
        summary="Adjust credits up or down, with a reason",
    )
    async def adjust(
        self,
        tenant_id: FromPath[str],
        data: JSONBody[CreditChange],
        admin: AdminDep,
        uow: UnitOfWorkDep,
    ) -> Response[Any]:
        return json_response(
            await change_credits(uow.session, tenant_id, data, EntryKind.ADJUSTMENT)
        )

    @get("/tenants/{tenant_id:str}/balance", summary="Balance, held credits and open holds")
    async def balance(
        self, tenant_id: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        await get_tenant(uow.session, tenant_id)
        return json_response(balance_json(tenant_id, await ledger.balance(uow.session, tenant_id)))

    @get(
        "/tenants/{tenant_id:str}/usage",
        summary="Usage by model and day: tasks, images, charged, upstream cost, margin",
        description="`format=csv` answers text/csv. Days are UTC; the default is the last 30.",
    )
    async def usage(
        self,
        tenant_id: FromPath[str],
        admin: AdminDep,
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

    @post("/tasks/{task_id:str}/refund", status_code=200, summary="Refund a task's charge")
    async def refund(
        self, task_id: FromPath[str], data: JSONBody[Refund], admin: AdminDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        if not data.reason.strip():
            raise InvalidRequest("reason", "a refund needs a reason")
        amount = None if data.amount is None else parse_amount(data.amount)
        refunded = await ledger.refund(uow.session, task_id, amount, data.reason)
        return json_response({"task_id": task_id, "refunded": credits_from_micros(refunded)})

    @get("/ledger/check", summary="Check every balance against the ledger")
    async def ledger_check(self, admin: AdminDep, uow: UnitOfWorkDep) -> Response[Any]:
        problems = await ledger.check(uow.session)
        return json_response({"ok": not problems, "problems": problems})

    @get("/tenants/{tenant_id:str}/limits", summary="A tenant's limits, own or default")
    async def tenant_limits(
        self, tenant_id: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep, services: ServicesDep
    ) -> Response[Any]:
        tenant = await get_tenant(uow.session, tenant_id)
        return json_response(tenant_limits_json(tenant, services.settings))

    @patch(
        "/tenants/{tenant_id:str}/limits",
        summary="Set a tenant's rate limit, burst, in-flight cap or model list",
        description="Fields left out stay; `null` returns a field to the default.",
    )
    async def set_tenant_limits(
        self,
        tenant_id: FromPath[str],
        data: JSONBody[TenantLimits],
        admin: AdminDep,
        uow: UnitOfWorkDep,
        services: ServicesDep,
    ) -> Response[Any]:
        tenant = await set_tenant_limits(uow.session, services.catalog, tenant_id, data)
        return json_response(tenant_limits_json(tenant, services.settings))

    @get("/keys/{key_id:str}/limits", summary="A key's limits, model list and budgets")
    async def key_limits(
        self, key_id: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep, services: ServicesDep
    ) -> Response[Any]:
        key = await uow.session.get(ApiKey, key_id)
        if key is None:
            raise NotFound(f"no key {key_id}")
        return json_response(await key_limits_json(uow.session, key, services.settings))

    @patch(
        "/keys/{key_id:str}/limits",
        summary="Set a key's rate limit, burst, model list or budgets",
        description="Budgets are credits (total, per UTC day, per UTC month). Fields left out "
        "stay; `null` returns a field to the default (no budget, every model).",
    )
    async def set_key_limits(
        self,
        key_id: FromPath[str],
        data: JSONBody[KeyLimits],
        admin: AdminDep,
        uow: UnitOfWorkDep,
        services: ServicesDep,
    ) -> Response[Any]:
        key = await set_key_limits(uow.session, services.catalog, key_id, data)
        return json_response(await key_limits_json(uow.session, key, services.settings))

    @get("/tasks/{task_id:str}/deliveries", summary="A task's callback deliveries")
    async def deliveries(
        self, task_id: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        task = await uow.session.get(Task, task_id)
        if task is None:
            raise NotFound(f"no task {task_id}")
        return json_response({"data": await callbacks.list_deliveries(uow.session, task_id)})

    @post("/tasks/{task_id:str}/deliveries", status_code=202, summary="Deliver a callback again")
    async def redeliver(
        self, task_id: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep, services: ServicesDep
    ) -> Response[Any]:
        task = await uow.session.get(Task, task_id)
        if task is None:
            raise NotFound(f"no task {task_id}")
        return json_response(
            await redeliver(uow.session, uow, services, task.tenant_id, task_id), 202
        )

    @patch(
        "/tenants/{tenant_id:str}/callbacks",
        summary="Put a tenant on the standard or the extended callback schedule",
    )
    async def callback_schedule(
        self,
        tenant_id: FromPath[str],
        data: JSONBody[CallbackSchedule],
        admin: AdminDep,
        uow: UnitOfWorkDep,
    ) -> Response[Any]:
        tenant = await get_tenant(uow.session, tenant_id)
        tenant.callback_schedule = data.schedule
        uow.session.add(tenant)
        return json_response({"tenant_id": tenant.id, "schedule": data.schedule})

    @get("/tasks", summary="List tasks, newest first")
    async def list_tasks(
        self,
        admin: AdminDep,
        uow: UnitOfWorkDep,
        tenant_id: FromQuery[str | None] = None,
        status: FromQuery[str | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    ) -> Response[Any]:
        tasks: list[Task] = await list_tasks(
            uow.session, tenant_id=tenant_id, status=status, limit=limit
        )
        return json_response({"data": [task_summary(t) for t in tasks]})

    @post(
        "/channels",
        summary="Add a channel (an upstream account)",
        description="The key is stored to call the upstream and never shown again: answers "
        "carry `api_key_set` instead. Workers use a new or changed channel within "
        "`TOLLGATE_CHANNEL_CACHE_TTL_SECONDS`.",
        responses={**error_responses(400, 401), **_NAME_TAKEN},
    )
    async def create_channel(
        self,
        data: JSONBody[NewChannel],
        admin: AdminDep,
        uow: UnitOfWorkDep,
        services: ServicesDep,
    ) -> Response[ChannelView]:
        channel = await channels.create_channel(uow.session, given_fields(data), services.catalog)
        return json_response(channels.channel_view(channel), 201)

    @get("/channels", summary="List channels, highest priority first")
    async def list_channels(self, admin: AdminDep, uow: UnitOfWorkDep) -> Response[ChannelList]:
        found = await channels.list_channels(uow.session)
        return json_response({"data": [channels.channel_view(c) for c in found]})

    @get(
        "/channels/{ref:str}",
        summary="A channel, by id or name",
        responses=error_responses(401, 404),
    )
    async def get_channel(
        self, ref: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep
    ) -> Response[ChannelView]:
        return json_response(channels.channel_view(await channels.get_channel(uow.session, ref)))

    @patch(
        "/channels/{ref:str}",
        summary="Change a channel, by id or name",
        description="Fields left out stay. `api_key` replaces the key (it cannot be read).",
        responses={**error_responses(400, 401, 404), **_NAME_TAKEN},
    )
    async def update_channel(
        self,
        ref: FromPath[str],
        data: JSONBody[ChannelChanges],
        admin: AdminDep,
        uow: UnitOfWorkDep,
        services: ServicesDep,
    ) -> Response[ChannelView]:
        channel = await channels.update_channel(
            uow.session, ref, given_fields(data), services.catalog
        )
        return json_response(channels.channel_view(channel))

    @delete(
        "/channels/{ref:str}",
        summary="Remove a channel, by id or name",
        description="New tasks go to the model's other channels; a task already running "
        "there finishes there.",
        responses=error_responses(401, 404),
    )
    async def delete_channel(self, ref: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep) -> None:
        await channels.delete_channel(uow.session, ref)
