"""The unified endpoint: submit a generation, read a task, list models, fetch results; and
the operator's list of tasks under ``/admin``, behind its guard (``gateway/admin.py``).

``submit_and_queue`` and ``cancel_and_queue`` are what every front door (this one,
``gateway/krea/routes.py``) does to submit or cancel: the change in the request's
transaction, the jobs it calls for queued only once that transaction commits.
"""

import logging
import time
from functools import partial
from typing import Annotated, Any

from litestar import Controller, Response, get, post
from litestar.di import Provide
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody, QueryParameter
from litestar.response import Stream

from gateway.auth import Principal
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
from gateway.errors import NotFound, ServiceUnavailable
from gateway.queue import enqueue_upstream_cancel
from gateway.responses import (
    admin_error_responses,
    encoded_response,
    error_responses,
    json_response,
)
from gateway.storage import CONTENT_TYPES, StorageUnavailable, check_key
from gateway.tasks import cancel, service, waiting
from gateway.tasks.models import Task
from gateway.tasks.schemas import GenerationRequest, ModelList, TaskObject, encode_json


async def submit_and_queue(
    services: Services,
    principal: Principal,
    *,
    fields: dict[str, Any],
    webhook_url: str | None,
    idempotency_key: str | None,
    api: str = "unified",
) -> service.TaskView:
    """Submit a generation (one database call that commits it); then queue its job.

    An Idempotency-Key retry answers with the first task and queues nothing. A model whose
    backlog could not finish before the task's deadline is 503 ``overloaded`` first
    (``gateway/tasks/backlog.py``).
    """
    settings = services.settings
    model = fields.get("model")
    if isinstance(model, str):
        await services.backlog.check(model)  # 503 overloaded before anything is held
    submission = await service.submit_generation(
        services.pg,
        reservations=services.reservations,
        catalog=services.catalog,
        settings=settings,
        principal=principal,
        fields=fields,
        webhook_url=webhook_url,
        idempotency_key=idempotency_key,
        api=api,
        prices=await services.prices.current(),
    )
    task = submission.task
    if submission.created:
        services.backlog.accepted(task.model)
        await service.queue_new_task(services.enqueues, settings.queue_name, task)
    return task


async def cancel_and_queue(
    uow: UnitOfWork, services: Services, tenant_id: str, task_id: str
) -> Task:
    """Cancel the tenant's task; after the commit, queue its callback and the upstream cancel."""
    cancellation = await cancel.cancel_task(uow.session, tenant_id, task_id)
    ended, settings = cancellation.ended, services.settings
    if ended.callback_url:
        uow.after_commit.append(
            partial(
                callbacks.queue_first_attempts,
                services.redis,
                settings.callback_queue_name,
                services.engine,
                task_id,
            )
        )
    if ended.channel_id and ended.upstream_job_id:
        uow.after_commit.append(
            partial(
                enqueue_upstream_cancel,
                services.redis,
                settings.queue_name,
                task_id,
                ended.channel_id,
                ended.upstream_job_id,
            )
        )
    return cancellation.task


def task_body(services: Services, task: service.TaskView) -> bytes:
    """The task object's JSON; a final task's is kept for the next reader."""
    body = encode_json(service.render_task(task, services.signer))
    services.finished.keep(task, body)
    return body


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
        task = await submit_and_queue(
            services,
            principal,
            fields=data.provided(),
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
        )
        return json_response(service.render_task(task, services.signer))

    @get(
        "/tasks/{task_id:str}",
        summary="Get a task",
        description="The task object, kept current. With `Prefer: wait=N` (RFC 7240, N at "
        "most 60) the answer waits until the task is final or N seconds have passed, then "
        "gives the task as it is; `Preference-Applied: wait=N` says how long it could wait.",
        responses=error_responses(400, 401, 404, 429, 503),
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
            body = services.finished.get(principal.tenant_id, task_id)
            if body is None:
                found = await services.task_reads.read(principal.tenant_id, task_id)
                body = task_body(services, found)
            return encoded_response(body)
        task = await waiting.wait_for_task(services, principal.tenant_id, task_id, wait)
        # The many waiters of one task wake together: the first renders its end, the
        # others answer the same bytes (kept in ``services.finished``).
        body = services.finished.get(principal.tenant_id, task_id) or task_body(services, task)
        response = encoded_response(body)
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
        responses=error_responses(400, 401, 404, 429, 503),
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
        responses=error_responses(400, 401, 404, 409, 429, 503),
    )
    async def cancel_task(
        self,
        task_id: FromPath[str],
        principal: PrincipalDep,
        services: ServicesDep,
        uow: UnitOfWorkDep,
    ) -> Response[TaskObject]:
        task = await cancel_and_queue(uow, services, principal.tenant_id, task_id)
        return json_response(service.render_task(task, services.signer))

    @get(
        "/models",
        summary="List the models this key may use",
        responses=error_responses(401, 429, 503),
    )
    async def list_models(
        self, principal: PrincipalDep, services: ServicesDep
    ) -> Response[ModelList]:
        prices = await services.prices.current()
        body = services.model_lists.body(prices, principal.user_group, principal.allowed_models)
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
        responses=error_responses(400, 404, 410, 503),
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


class TaskAdminController(Controller):
    path = "/"

    @get("/tasks", summary="List tasks, newest first", responses=admin_error_responses(400, 401))
    async def list_tasks(
        self,
        uow: UnitOfWorkDep,
        tenant_id: FromQuery[str | None] = None,
        status: FromQuery[str | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    ) -> Response[Any]:
        found = await service.list_tasks(
            uow.session, tenant_id=tenant_id, status=status, limit=limit
        )
        return json_response({"data": [service.task_summary(t) for t in found]})
