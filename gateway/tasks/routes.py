"""The unified endpoint: submit a generation, read a task, list models, fetch results."""

import logging
import time
from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.di import Provide
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody
from litestar.response import Stream

from gateway.deps import PrincipalDep, ServicesDep, UnitOfWorkDep, provide_principal, provide_uow
from gateway.errors import NotFound, ServiceUnavailable, error_responses
from gateway.storage import CONTENT_TYPES, StorageUnavailable, check_key
from gateway.tasks import cancel, service
from gateway.tasks.schemas import (
    GenerationRequest,
    ModelList,
    TaskObject,
    encode_json,
    encoded_response,
    json_response,
)

logger = logging.getLogger("tollgate.files")


class TaskController(Controller):
    path = "/v1"
    tags = ["images"]
    dependencies = {"principal": Provide(provide_principal)}
    security = [{"bearerAuth": []}]

    @post(
        "/images/generations",
        status_code=200,
        summary="Create an image generation task",
        responses=error_responses(400, 401, 402, 403, 409, 413, 429, 503),
        description="Validates the request against the model catalogue, reserves its price "
        "from the tenant's credits (402 when they are short), records a pending task and "
        "queues it. Poll `GET /v1/tasks/{id}` for the result. With an `Idempotency-Key` "
        "header, a retry returns the first task and charges once.",
    )
    async def create_generation(
        self,
        data: JSONBody[GenerationRequest],
        principal: PrincipalDep,
        services: ServicesDep,
        webhook_url: Annotated[str | None, HeaderParameter(name="X-Webhook-URL")] = None,
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key")] = None,
    ) -> Response[TaskObject]:
        submission = await service.submit_generation(
            services.pg,
            catalog=services.catalog,
            settings=services.settings,
            principal=principal,
            fields=data.provided(),
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
        )
        task = submission.task
        if submission.created:
            await service.queue_new_task(services.quick_redis, services.settings.queue_name, task)
        return json_response(service.render_task(task, services.signer))

    @get(
        "/tasks/{task_id:str}",
        summary="Get a task",
        description="The task object, kept current.",
        responses=error_responses(401, 404),
    )
    async def get_task(
        self, task_id: FromPath[str], principal: PrincipalDep, services: ServicesDep
    ) -> Response[TaskObject]:
        body = services.finished.get(principal.tenant_id, task_id)
        if body is None:
            task = await service.read_task(services.pg, principal.tenant_id, task_id)
            body = encode_json(service.render_task(task, services.signer))
            services.finished.keep(task, body)
        return encoded_response(body)

    @post(
        "/tasks/{task_id:str}/cancel",
        status_code=200,
        dependencies={"uow": Provide(provide_uow)},
        summary="Cancel a task",
        description="Cancels the task while its `task_info.can_cancel` is true: a pending "
        "task, or one whose upstream can stop the running generation. The task becomes "
        "`cancelled` and its reserved credits are released; nothing is charged. A task that "
        "is final, or running where it cannot be stopped, answers 409.",
        responses=error_responses(401, 404, 409),
    )
    async def cancel_task(
        self,
        task_id: FromPath[str],
        principal: PrincipalDep,
        services: ServicesDep,
        uow: UnitOfWorkDep,
    ) -> Response[TaskObject]:
        task = await cancel.cancel_task(uow, services, principal.tenant_id, task_id)
        return json_response(service.render_task(task, services.signer))

    @get("/models", summary="List the models this key may use", responses=error_responses(401))
    async def list_models(
        self, principal: PrincipalDep, services: ServicesDep
    ) -> Response[ModelList]:
        body = services.model_lists.body(principal.allowed_models)
        return encoded_response(body)


class FileController(Controller):
    """Result images under signed, expiring links; the link is the credential."""

    path = "/v1/files"
    tags = ["images"]

    @get(
        "/{task_id:str}/{name:str}",
        summary="Download a result image",
        description="Links come from a completed task's `results`; they expire at `expires_at` "
        "(410 after). 503 when the result store cannot be reached.",
        media_type="image/png",
        responses=error_responses(404, 410, 503),
    )
    async def download(
        self,
        task_id: FromPath[str],
        name: FromPath[str],
        services: ServicesDep,
        expires: FromQuery[str | None] = None,
        signature: FromQuery[str | None] = None,
    ) -> Stream:
        key = f"{task_id}/{name}"
        try:
            check_key(key)
        except ValueError:
            raise NotFound("File not found") from None
        services.signer.verify(key, expires, signature, time.time())
        try:
            found = await services.storage.open(key)
        except StorageUnavailable as exc:
            logger.warning("file %s: %s", key, exc)
            raise ServiceUnavailable(
                "The result store is unavailable, please retry", headers={"Retry-After": "5"}
            ) from None
        if found is None:
            raise NotFound("File not found")
        content_type = CONTENT_TYPES[name.rsplit(".", 1)[1]]
        # Streamed as it arrives from the store: a large image is never held whole here.
        return Stream(
            found.chunks,
            media_type=content_type,
            headers={"Content-Length": str(found.size), "Cache-Control": "private, max-age=3600"},
        )
