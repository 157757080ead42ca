"""Admin routes for tenants and their keys (under ``/admin``, behind its guard:
``gateway/admin.py``).

A key's secret appears once, in the response that issues it.
"""

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, delete, get, patch, post
from litestar.params import FromPath, JSONBody

from gateway.deps import ServicesDep, UnitOfWorkDep
from gateway.errors import InvalidRequest
from gateway.responses import admin_error_responses, json_response
from gateway.tenants import keys as key_lifecycle
from gateway.tenants import service as tenants
from gateway.tenants.service import key_json, tenant_json

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Group = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")]
Label = Annotated[str, msgspec.Meta(max_length=200)]


class NewTenant(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    user_group: Group = "default"


class TenantChange(msgspec.Struct, forbid_unknown_fields=True):
    """Fields left out stay as they are."""

    name: Name | None = None
    user_group: Group | None = None
    suspended: bool | None = None


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    name: Label = ""
    # Refused with 401 key_expired from this instant (RFC 3339 with an offset); none: never.
    expires_at: datetime | None = None
    # The scope of the tenant's own key routes (/v1/keys); an operator's keys have it.
    can_manage_keys: bool = True


GraceSeconds = Annotated[int, msgspec.Meta(ge=0, le=key_lifecycle.MAX_GRACE_SECONDS)]


class Rotation(msgspec.Struct, forbid_unknown_fields=True):
    # How long the old secret keeps working; none: TOLLGATE_KEY_ROTATION_GRACE_SECONDS.
    grace_seconds: GraceSeconds | None = None


def aware(moment: datetime | None, field: str) -> datetime | None:
    """A time the client gave, which must say its offset (400 naming the field)."""
    if moment is not None and moment.tzinfo is None:
        raise InvalidRequest(field, "must give a time zone offset, e.g. 2027-01-01T00:00:00Z")
    return moment


class TenantAdminController(Controller):
    path = "/"

    @post("/tenants", summary="Create a tenant", responses=admin_error_responses(400, 401, 409))
    async def create_tenant(self, data: JSONBody[NewTenant], uow: UnitOfWorkDep) -> Response[Any]:
        tenant = await tenants.create_tenant(
            uow.session, name=data.name, user_group=data.user_group
        )
        return json_response(tenant_json(tenant), 201)

    @get("/tenants", summary="List tenants", responses=admin_error_responses(401))
    async def list_tenants(self, uow: UnitOfWorkDep) -> Response[Any]:
        found = await tenants.list_tenants(uow.session)
        return json_response({"data": [tenant_json(t) for t in found]})

    @patch(
        "/tenants/{tenant_id:str}",
        summary="Rename, regroup, suspend or resume a tenant",
        description="A suspended tenant's submits answer 403 `tenant_suspended`; its reads "
        "work and its open tasks finish. Takes effect on every gateway within "
        "`TOLLGATE_KEY_CACHE_TTL_SECONDS`.",
        responses=admin_error_responses(400, 401, 404, 409),
    )
    async def update_tenant(
        self, tenant_id: FromPath[str], data: JSONBody[TenantChange], uow: UnitOfWorkDep
    ) -> Response[Any]:
        tenant = await tenants.update_tenant(
            uow.session,
            tenant_id,
            name=data.name,
            user_group=data.user_group,
            suspended=data.suspended,
        )
        return json_response(tenant_json(tenant))

    @delete(
        "/tenants/{tenant_id:str}",
        status_code=200,
        summary="Delete a tenant: suspend it and revoke its keys, keeping its ledger",
        responses=admin_error_responses(400, 401, 404),
    )
    async def delete_tenant(self, tenant_id: FromPath[str], uow: UnitOfWorkDep) -> Response[Any]:
        return json_response(tenant_json(await tenants.delete_tenant(uow.session, tenant_id)))

    @post(
        "/tenants/{tenant_id:str}/keys",
        summary="Issue an API key (its secret is shown once)",
        responses=admin_error_responses(400, 401, 404, 409),
    )
    async def issue_key(
        self, tenant_id: FromPath[str], uow: UnitOfWorkDep, data: JSONBody[NewKey | None] = None
    ) -> Response[Any]:
        data = data or NewKey()
        tenant = await tenants.get_tenant(uow.session, tenant_id)
        issued = await tenants.issue_key(
            uow.session,
            tenant,
            name=data.name,
            expires_at=aware(data.expires_at, "expires_at"),
            can_manage_keys=data.can_manage_keys,
        )
        return json_response({**key_json(issued.key), "key": issued.secret}, 201)

    @post(
        "/keys/{key_id:str}/rotate",
        status_code=200,
        summary="Rotate an API key: a new secret, the old one valid for a grace period",
        responses=admin_error_responses(400, 401, 404, 409),
    )
    async def rotate_key(
        self,
        key_id: FromPath[str],
        uow: UnitOfWorkDep,
        services: ServicesDep,
        data: JSONBody[Rotation | None] = None,
    ) -> Response[Any]:
        grace = data.grace_seconds if data else None
        if grace is None:
            grace = services.settings.key_rotation_grace_seconds
        issued = await key_lifecycle.rotate_key(uow.session, key_id, grace)
        return json_response({**key_json(issued.key), "key": issued.secret})

    @get(
        "/tenants/{tenant_id:str}/keys",
        summary="List a tenant's keys",
        responses=admin_error_responses(400, 401, 404),
    )
    async def list_keys(self, tenant_id: FromPath[str], uow: UnitOfWorkDep) -> Response[Any]:
        await tenants.get_tenant(uow.session, tenant_id)
        found = await tenants.list_keys(uow.session, tenant_id)
        return json_response({"data": [key_json(k) for k in found]})

    @post(
        "/keys/{key_id:str}/revoke",
        status_code=200,
        summary="Revoke an API key",
        responses=admin_error_responses(400, 401, 404),
    )
    async def revoke_key(self, key_id: FromPath[str], uow: UnitOfWorkDep) -> Response[Any]:
        return json_response(key_json(await tenants.revoke_key(uow.session, key_id)))
