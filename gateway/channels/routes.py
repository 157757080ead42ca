"""Admin routes for channels, the upstream accounts (under ``/admin``, behind its guard:
``gateway/admin.py``). No struct or view carries a key back out.
"""

from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Response, delete, get, patch, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody

from gateway.channels import service as channels
from gateway.channels.models import ADAPTER_NAMES, Channel
from gateway.deps import ServicesDep, UnitOfWorkDep
from gateway.errors import ErrorResponse
from gateway.responses import admin_error_responses, json_response

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


class ChannelCost(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What this account pays its upstream for one model, in the upstream's currency."""

    currency: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$", description="USD, CNY, KCU…")]
    rule: Literal["per_call", "per_image", "per_megapixel_step"]
    amount: Decimal
    by_quality: dict[str, Decimal] | None = None
    with_style_references: Decimal | None = None
    with_moodboard: Decimal | None = None


UpstreamCosts = Annotated[
    dict[str, ChannelCost],
    msgspec.Meta(
        description="Catalogue model id -> this account's own upstream cost, overriding the "
        "catalogue's `upstream_cost`; recorded on each task the channel makes."
    ),
]


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
    upstream_costs: UpstreamCosts | msgspec.UnsetType = msgspec.UNSET


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
    upstream_costs: UpstreamCosts | msgspec.UnsetType = msgspec.UNSET


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
    upstream_costs: dict[str, dict[str, Any]]
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
    """The fields of a decoded body that were sent (nested structs as plain data)."""
    return {
        name: msgspec.to_builtins(value) if isinstance(value, dict) else value
        for name in data.__struct_fields__
        if (value := getattr(data, name)) is not msgspec.UNSET
    }


class ChannelAdminController(Controller):
    path = "/"

    @post(
        "/channels",
        summary="Add a channel (an upstream account)",
        description="The key is stored to call the upstream and never shown again: answers "
        "carry `api_key_set` instead. Workers use a new or changed channel within "
        "`TOLLGATE_CHANNEL_CACHE_TTL_SECONDS`.",
        responses={**admin_error_responses(400, 401), **_NAME_TAKEN},
    )
    async def create_channel(
        self,
        data: JSONBody[NewChannel],
        uow: UnitOfWorkDep,
        services: ServicesDep,
    ) -> Response[ChannelView]:
        channel = await channels.create_channel(uow.session, given_fields(data), services.catalog)
        return json_response(channels.channel_view(channel), 201)

    @get(
        "/channels",
        summary="List channels, highest priority first",
        responses=admin_error_responses(401),
    )
    async def list_channels(self, uow: UnitOfWorkDep) -> Response[ChannelList]:
        found = await channels.list_channels(uow.session)
        return json_response({"data": [channels.channel_view(c) for c in found]})

    @get(
        "/channels/{ref:str}",
        summary="A channel, by id or name",
        responses=admin_error_responses(400, 401, 404),
    )
    async def get_channel(self, ref: FromPath[str], uow: UnitOfWorkDep) -> Response[ChannelView]:
        return json_response(channels.channel_view(await channels.get_channel(uow.session, ref)))

    @patch(
        "/channels/{ref:str}",
        summary="Change a channel, by id or name",
        description="Fields left out stay. `api_key` replaces the key (it cannot be read).",
        responses={**admin_error_responses(400, 401, 404), **_NAME_TAKEN},
    )
    async def update_channel(
        self,
        ref: FromPath[str],
        data: JSONBody[ChannelChanges],
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
        responses=admin_error_responses(400, 401, 404),
    )
    async def delete_channel(self, ref: FromPath[str], uow: UnitOfWorkDep) -> None:
        await channels.delete_channel(uow.session, ref)
