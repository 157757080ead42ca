"""Callback routes: the tenant's (webhook secret, a task's deliveries, redelivery) under
``/v1``, and the operator's (any task's deliveries, redelivery, a tenant's schedule) under
``/admin``, behind its guard (``gateway/admin.py``). A new delivery is queued after commit.
"""

from functools import partial
from typing import Any, Literal

import msgspec
from litestar import Controller, Response, get, patch, post
from litestar.di import Provide
from litestar.params import FromPath, JSONBody

from gateway.callbacks import service as callbacks
from gateway.deps import (
    PrincipalDep,
    Services,
    ServicesDep,
    UnitOfWork,
    UnitOfWorkDep,
    provide_principal,
    provide_uow,
)
from gateway.queue import enqueue_callback
from gateway.responses import admin_error_responses, error_responses, json_response
from gateway.tasks.service import get_task, get_tenant_task
from gateway.tenants.models import Tenant, new_webhook_secret


class CallbackSchedule(msgspec.Struct, forbid_unknown_fields=True):
    """``standard``: retries after 1, 2, 4 s. ``extended``: then hourly for a day."""

    schedule: Literal["standard", "extended"]


async def redeliver_and_queue(
    uow: UnitOfWork, services: Services, tenant_id: str, task_id: str
) -> Response[Any]:
    """A new delivery of a finished task's callback, queued after commit (tenant and admin)."""
    delivery_id = await callbacks.redeliver(uow.session, tenant_id, task_id)
    queue = services.settings.callback_queue_name
    uow.after_commit.append(partial(enqueue_callback, services.redis, queue, delivery_id, 1))
    return json_response({"id": delivery_id, "status": "pending"}, 202)


class WebhookController(Controller):
    path = "/v1"
    tags = ["webhooks"]
    dependencies = {"principal": Provide(provide_principal), "uow": Provide(provide_uow)}
    security = [{"bearerAuth": []}]

    @get(
        "/webhooks/secret",
        summary="The secret that signs your callbacks (Standard Webhooks)",
        responses=error_responses(401, 429, 503),
    )
    async def secret(self, principal: PrincipalDep, uow: UnitOfWorkDep) -> Response[Any]:
        tenant = await uow.session.get(Tenant, principal.tenant_id)
        assert tenant is not None
        return json_response({"secret": tenant.webhook_secret})

    @post(
        "/webhooks/secret/rotate",
        status_code=200,
        summary="Replace the signing secret; deliveries from now on use the new one",
        responses=error_responses(401, 429, 503),
    )
    async def rotate(self, principal: PrincipalDep, uow: UnitOfWorkDep) -> Response[Any]:
        tenant = await uow.session.get(Tenant, principal.tenant_id, with_for_update=True)
        assert tenant is not None
        tenant.webhook_secret = new_webhook_secret()
        uow.session.add(tenant)
        return json_response({"secret": tenant.webhook_secret})

    @get(
        "/tasks/{task_id:str}/deliveries",
        summary="A task's callback deliveries and every attempt",
        responses=error_responses(400, 401, 404, 429, 503),
    )
    async def deliveries(
        self, task_id: FromPath[str], principal: PrincipalDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        await get_tenant_task(uow.session, principal.tenant_id, task_id)
        return json_response({"data": await callbacks.list_deliveries(uow.session, task_id)})

    @post(
        "/tasks/{task_id:str}/deliveries",
        status_code=202,
        summary="Deliver a finished task's callback again",
        responses=error_responses(400, 401, 404, 409, 429, 503),
    )
    async def redeliver(
        self,
        task_id: FromPath[str],
        principal: PrincipalDep,
        uow: UnitOfWorkDep,
        services: ServicesDep,
    ) -> Response[Any]:
        return await redeliver_and_queue(uow, services, principal.tenant_id, task_id)


class CallbackAdminController(Controller):
    path = "/"

    @get(
        "/tasks/{task_id:str}/deliveries",
        summary="A task's callback deliveries",
        responses=admin_error_responses(400, 401, 404),
    )
    async def deliveries(self, task_id: FromPath[str], uow: UnitOfWorkDep) -> Response[Any]:
        await get_task(uow.session, task_id)
        return json_response({"data": await callbacks.list_deliveries(uow.session, task_id)})

    @post(
        "/tasks/{task_id:str}/deliveries",
        status_code=202,
        summary="Deliver a callback again",
        responses=admin_error_responses(400, 401, 404, 409),
    )
    async def redeliver(
        self, task_id: FromPath[str], uow: UnitOfWorkDep, services: ServicesDep
    ) -> Response[Any]:
        task = await get_task(uow.session, task_id)
        return await redeliver_and_queue(uow, services, task.tenant_id, task_id)

    @patch(
        "/tenants/{tenant_id:str}/callbacks",
        summary="Put a tenant on the standard or the extended callback schedule",
        responses=admin_error_responses(400, 401, 404),
    )
    async def callback_schedule(
        self, tenant_id: FromPath[str], data: JSONBody[CallbackSchedule], uow: UnitOfWorkDep
    ) -> Response[Any]:
        await callbacks.set_schedule(uow.session, tenant_id, data.schedule)
        return json_response({"tenant_id": tenant_id, "schedule": data.schedule})
