"""Tenant routes: the webhook secret, a task's deliveries, redelivery."""

from functools import partial
from typing import Any

from litestar import Controller, Response, get, post
from litestar.di import Provide
from litestar.params import FromPath
from sqlmodel.ext.asyncio.session import AsyncSession

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
from gateway.errors import Conflict, error_responses
from gateway.queue import enqueue_callback
from gateway.tasks.models import FINAL_STATES
from gateway.tasks.schemas import encode_json
from gateway.tasks.service import get_tenant_task
from gateway.tenants import Tenant, new_webhook_secret


def _json(value: object, status: int = 200) -> Response[Any]:
    return Response(content=encode_json(value), media_type="application/json", status_code=status)


async def redeliver(
    session: AsyncSession, uow: UnitOfWork, services: Services, tenant_id: str, task_id: str
) -> dict[str, Any]:
    """A new delivery of a finished task's callback, queued after commit (tenant and admin)."""
    task = await get_tenant_task(session, tenant_id, task_id)
    if task.callback_url is None:
        raise Conflict("This task has no callback_url to deliver to")
    if task.status not in FINAL_STATES:
        raise Conflict("This task has not finished; its callback is sent when it does")
    delivery_id = await callbacks.create_delivery(session, task.id, tenant_id, task.callback_url)
    uow.after_commit.append(
        partial(
            enqueue_callback, services.redis, services.settings.callback_queue_name, delivery_id, 1
        )
    )
    return {"id": delivery_id, "status": "pending"}


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
        return _json({"secret": tenant.webhook_secret})

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
        return _json({"secret": tenant.webhook_secret})

    @get(
        "/tasks/{task_id:str}/deliveries",
        summary="A task's callback deliveries and every attempt",
        responses=error_responses(400, 401, 404, 429, 503),
    )
    async def deliveries(
        self, task_id: FromPath[str], principal: PrincipalDep, uow: UnitOfWorkDep
    ) -> Response[Any]:
        await get_tenant_task(uow.session, principal.tenant_id, task_id)
        return _json({"data": await callbacks.list_deliveries(uow.session, task_id)})

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
        made = await redeliver(uow.session, uow, services, principal.tenant_id, task_id)
        return _json(made, 202)
