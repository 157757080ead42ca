"""Admin routes for a tenant's and a key's limits (under ``/admin``, behind its guard).

A field left out stays; ``null`` returns a field to the default (``overrides.py``).
"""

from typing import Any

from litestar import Controller, Response, get, patch
from litestar.params import FromPath, JSONBody

from gateway.deps import ServicesDep, UnitOfWorkDep
from gateway.limits.overrides import (
    KeyLimits,
    TenantLimits,
    key_limits_json,
    set_key_limits,
    set_tenant_limits,
    tenant_limits_json,
)
from gateway.responses import admin_error_responses, json_response
from gateway.tenants.service import get_key, get_tenant


class LimitsAdminController(Controller):
    path = "/"

    @get(
        "/tenants/{tenant_id:str}/limits",
        summary="A tenant's limits, own or default",
        responses=admin_error_responses(400, 401, 404),
    )
    async def tenant_limits(
        self, tenant_id: FromPath[str], uow: UnitOfWorkDep, services: ServicesDep
    ) -> Response[Any]:
        tenant = await get_tenant(uow.session, tenant_id)
        return json_response(tenant_limits_json(tenant, services.settings))

    @patch(
        "/tenants/{tenant_id:str}/limits",
        summary="Set a tenant's rate limit, burst, in-flight cap or model list",
        description="Fields left out stay; `null` returns a field to the default.",
        responses=admin_error_responses(400, 401, 404),
    )
    async def set_tenant_limits(
        self,
        tenant_id: FromPath[str],
        data: JSONBody[TenantLimits],
        uow: UnitOfWorkDep,
        services: ServicesDep,
    ) -> Response[Any]:
        tenant = await set_tenant_limits(uow.session, services.catalog, tenant_id, data)
        return json_response(tenant_limits_json(tenant, services.settings))

    @get(
        "/keys/{key_id:str}/limits",
        summary="A key's limits, model list and budgets",
        responses=admin_error_responses(400, 401, 404),
    )
    async def key_limits(
        self, key_id: FromPath[str], uow: UnitOfWorkDep, services: ServicesDep
    ) -> Response[Any]:
        key = await get_key(uow.session, key_id)
        return json_response(await key_limits_json(uow.session, key, services.settings))

    @patch(
        "/keys/{key_id:str}/limits",
        summary="Set a key's rate limit, burst, model list or budgets",
        description="Budgets are credits (total, per UTC day, per UTC month). Fields left out "
        "stay; `null` returns a field to the default (no budget, every model).",
        responses=admin_error_responses(400, 401, 404),
    )
    async def set_key_limits(
        self,
        key_id: FromPath[str],
        data: JSONBody[KeyLimits],
        uow: UnitOfWorkDep,
        services: ServicesDep,
    ) -> Response[Any]:
        key = await set_key_limits(uow.session, services.catalog, key_id, data)
        return json_response(await key_limits_json(uow.session, key, services.settings))
