"""Admin routes for tenants and their keys (under ``/admin``, behind its guard:
``gateway/admin.py``).

A key's secret appears once, in the response that issues it.
"""

from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, get, post
from litestar.params import FromPath, JSONBody

from gateway.deps import UnitOfWorkDep
from gateway.responses import admin_error_responses, json_response
from gateway.tenants import service as tenants
from gateway.tenants.service import key_json, tenant_json

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Group = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")]
Label = Annotated[str, msgspec.Meta(max_length=200)]


class NewTenant(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    user_group: Group = "default"


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    name: Label = ""


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

    @post(
        "/tenants/{tenant_id:str}/keys",
        summary="Issue an API key (its secret is shown once)",
        responses=admin_error_responses(400, 401, 404),
    )
    async def issue_key(
        self, tenant_id: FromPath[str], uow: UnitOfWorkDep, data: JSONBody[NewKey | None] = None
    ) -> Response[Any]:
        tenant = await tenants.get_tenant(uow.session, tenant_id)
        issued = await tenants.issue_key(uow.session, tenant, name=data.name if data else "")
        return json_response({**key_json(issued.key), "key": issued.secret}, 201)

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
