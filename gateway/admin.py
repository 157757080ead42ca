"""The operator's API under ``/admin``, guarded by ``TOLLGATE_ADMIN_TOKEN``.

Tenants, their keys (a key's secret appears once, in the response that issues
it) and a view of tasks. The CLI (``gateway/cli.py``) calls the same services.
"""

from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, get, post
from litestar.di import Provide
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from gateway.deps import AdminDep, UnitOfWorkDep, provide_admin, provide_uow
from gateway.tasks.models import Task
from gateway.tasks.schemas import encode_json
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

JSON = "application/json"


class NewTenant(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    user_group: str = "default"


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    name: str = ""


def tenant_json(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "name": tenant.name,
        "user_group": tenant.user_group,
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


def _json(value: object, status: int = 200) -> Response[Any]:
    return Response(content=encode_json(value), media_type=JSON, status_code=status)


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
        return _json(tenant_json(tenant), 201)

    @get("/tenants", summary="List tenants")
    async def list_tenants(self, admin: AdminDep, uow: UnitOfWorkDep) -> Response[Any]:
        return _json({"data": [tenant_json(t) for t in await list_tenants(uow.session)]})

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
        return _json({**key_json(issued.key), "key": issued.secret}, 201)

    @get("/tenants/{tenant_id:str}/keys", summary="List a tenant's keys")
    async def list_keys(
        self, tenant_id: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        await get_tenant(uow.session, tenant_id)
        return _json({"data": [key_json(k) for k in await list_keys(uow.session, tenant_id)]})

    @post("/keys/{key_id:str}/revoke", status_code=200, summary="Revoke an API key")
    async def revoke_key(
        self, key_id: FromPath[str], admin: AdminDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        return _json(key_json(await revoke_key(uow.session, key_id)))

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
        return _json({"data": [task_summary(t) for t in tasks]})
