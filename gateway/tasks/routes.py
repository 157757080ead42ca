"""The unified endpoint: submit a generation, read a task, list models, fetch results."""

import time
from functools import partial
from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.di import Provide
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody
from litestar.response import Stream

from gateway.catalog_view import model_list
from gateway.deps import PrincipalDep, ServicesDep, UnitOfWorkDep, provide_principal, provide_uow
from gateway.errors import NotFound, error_responses
from gateway.queue import enqueue_generation
from gateway.storage import CONTENT_TYPES, check_key
from gateway.tasks import cancel, service, waiting
from gateway.tasks.schemas import (
    GenerationRequest,
    ModelList,
    TaskObject,
    json_response,
)


class TaskController(Controller):
    path = "/v1"
    tags = ["images"]
    dependencies = {"principal": Provide(provide_principal)}
    security = [{"bearerAuth": []}]

    @post(
        "/images/generations",
        status_code=200,
        dependencies={"uow": Provide(provide_uow)},
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
        uow: UnitOfWorkDep,
        webhook_url: Annotated[str | None, HeaderParameter(name="X-Webhook-URL")] = None,
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key")] = None,
    ) -> Response[TaskObject]:
        submission = await service.submit_generation(
            uow.session,
            catalog=services.catalog,
            settings=services.settings,
            principal=principal,
            fields=data.provided(),
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
        )
        task = submission.task
        if submission.created:
            uow.after_commit.append(
                partial(
                    enqueue_generation,
                    services.redis,
                    services.settings.queue_name,
                    task.id,
                    task.attempt,
                )
            )
        return json_response(service.render_task(task, services.signer))

    @get(
        "/tasks/{task_id:str}",
        summary="Get a task",
        description="The task object, kept current. With `Prefer: wait=N` (RFC 7240, N at "
        "most 60) the answer waits until the task is final or N seconds have passed, then "
        "gives the task as it is; `Preference-Applied: wait=N` says how long it could wait.",
        responses=error_responses(400, 401, 404),
    )
    async def get_task(
        self,
        task_id: FromPath[str],
        principal: PrincipalDep,
        services: ServicesDep,
        prefer: Annotated[str | None, HeaderParameter(name="Prefer")] = None,
    ) -> Response[TaskObject]:
        wait = waiting.requested_wait(prefer)
        if wait is None:
            task = await waiting.read_task(services, principal.tenant_id, task_id)
            return json_response(service.render_task(task, services.signer))
        task = await waiting.wait_for_task(services, principal.tenant_id, task_id, wait)
        response = json_response(service.render_task(task, services.signer))
        response.headers["Preference-Applied"] = f"wait={wait}"
        return response

    @get(
        "/tasks/{task_id:str}/events",
        summary="Stream a task's changes (server-sent events)",
        description="`text/event-stream` of the task object: one `task` event when you "
        "connect and one per change of status or progress, each with the id "
        "`<status>.<progress>`; the stream ends after the final state. Reconnect with "
        "`Last-Event-ID` to resume: changes you saw are not sent again.",
        media_type="text/event-stream",
        responses=error_responses(400, 401, 404),
    )
    async def task_events(
        self,
        task_id: FromPath[str],
        principal: PrincipalDep,
        services: ServicesDep,
        last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
    ) -> Stream:
        last = waiting.parse_event_id(last_event_id)
        # Read once before answering, so an unknown task is a 404 and not an empty stream.
        await waiting.read_task(services, principal.tenant_id, task_id)
        events = waiting.task_events(
            services,
            principal.tenant_id,
            task_id,
            last,
            partial(service.render_task, signer=services.signer),
        )
        return Stream(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

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
        return json_response(model_list(services.catalog, principal.allowed_models))


class FileController(Controller):
    """Result images under signed, expiring links; the link is the credential."""

    path = "/v1/files"
    tags = ["images"]

    @get(
        "/{task_id:str}/{name:str}",
        summary="Download a result image",
        description="Links come from a completed task's `results`; they expire at `expires_at`.",
        media_type="image/png",
        responses=error_responses(404, 410),
    )
    async def download(
        self,
        task_id: FromPath[str],
        name: FromPath[str],
        services: ServicesDep,
        expires: FromQuery[str | None] = None,
        signature: FromQuery[str | None] = None,
    ) -> Response[bytes]:
        key = f"{task_id}/{name}"
        try:
            check_key(key)
        except ValueError:
            raise NotFound("File not found") from None
        services.signer.verify(key, expires, signature, time.time())
        data = await services.storage.get(key)
        if data is None:
            raise NotFound("File not found")
        content_type = CONTENT_TYPES[name.rsplit(".", 1)[1]]
        return Response(
            content=data,
            media_type=content_type,
            headers={"Cache-Control": "private, max-age=3600"},
        )
