"""``/openai/v1``: the OpenAI Images API in front of the same tasks (docs/openai.md)."""

import asyncio
import base64
import contextlib
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import ResponseSpec
from litestar.params import HeaderParameter, JSONBody

from gateway.auth import Principal
from gateway.deps import PrincipalDep, Services, ServicesDep, provide_principal, provide_uow
from gateway.errors import ApiError, Conflict, InvalidRequest
from gateway.openai_api.mapping import unified_fields
from gateway.openai_api.schemas import (
    OpenAIErrorBody,
    OpenAIErrorDetail,
    OpenAIImage,
    OpenAIImagesResponse,
    OpenAIModel,
    OpenAIModelList,
)
from gateway.responses import JSON, error_responses, exception_handler, json_response
from gateway.tasks import service, waiting
from gateway.tasks.models import TaskStatus
from gateway.tasks.routes import cancel_and_queue, submit_and_queue
from gateway.tasks.service import TaskRecord
from pricing.catalog import DEFAULT_CATALOG_PATH
from pricing.money import credits_from_micros

API = "openai"  # Task.api of the tasks this door creates

TASK_HEADER = "X-Tollgate-Task-Id"
RESERVED_HEADER = "X-Tollgate-Credits-Reserved"
CHARGED_HEADER = "X-Tollgate-Credits-Charged"

logger = logging.getLogger("tollgate.openai")
_encoder = msgspec.json.Encoder()


class GenerationEnded(ApiError):
    """The task ended without images, or did not end in time; the message names it."""

    def __init__(
        self,
        status: int,
        code: str,
        type_: str,
        message: str,
        task_id: str,
        *,
        retry: bool,
    ) -> None:
        super().__init__(message, headers={TASK_HEADER: task_id})
        self.status_code = status
        self.error_code = code
        self.error_type = type_
        if not retry:
            # The OpenAI SDK retries 5xx, 409 and 429 unless told not to; a retry here
            # would start (and possibly pay for) another generation.
            self.headers["x-should-retry"] = "false"


def openai_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Every error of this door in OpenAI's shape, with the status the SDK maps to its class.

    The unified translator decides message and headers. Out of credits or budget
    (402 elsewhere) is 429 ``insufficient_quota``, as OpenAI answers it (the SDK's
    ``RateLimitError``), marked not to be retried.
    """
    if isinstance(exc, GenerationEnded):
        status, code, type_ = exc.status_code, exc.error_code, exc.error_type
        message, headers = exc.message, dict(exc.headers)
    else:
        unified = exception_handler(request, exc)
        detail = msgspec.json.decode(unified.content)["error"]
        status, code, type_ = unified.status_code or 500, detail["code"], detail["type"]
        message, headers = detail["message"], dict(unified.headers or {})
    if status == 402:
        status, type_ = 429, "insufficient_quota"
        headers["x-should-retry"] = "false"
    param = exc.field if isinstance(exc, InvalidRequest) else None
    body = OpenAIErrorBody(OpenAIErrorDetail(message=message, type=type_, param=param, code=code))
    return Response(
        content=_encoder.encode(body), status_code=status, media_type=JSON, headers=headers
    )


# What this door's error answers mean where they differ from the unified door's.
_DESCRIBED = {
    409: "Conflict: an Idempotency-Key reused with another body, or the generation was "
    "cancelled (the message names the task)",
    429: "A rate limit or the cap on tasks in flight (see Retry-After), or out of credits "
    "or budget (`insufficient_quota`, not to be retried)",
    500: "The generation failed (the message names the task); nothing was charged",
    504: "The generation did not finish in time or the client left; the message says "
    "whether the task was cancelled or runs on (and names it)",
}


def openai_error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for this door's error answers, in OpenAI's shape (``openai_error``)."""
    unified = error_responses(*(s for s in statuses if s not in _DESCRIBED))
    return {
        status: ResponseSpec(
            data_container=OpenAIErrorBody,
            description=_DESCRIBED[status] if status in _DESCRIBED else unified[status].description,
            generate_examples=False,
        )
        for status in statuses
    }


def _ended_without_images(task: TaskRecord) -> GenerationEnded:
    if task.status == TaskStatus.CANCELLED.value:
        return GenerationEnded(
            409,
            "cancelled",
            "invalid_request_error",
            f"The generation was cancelled (task {task.id}); nothing was charged",
            task.id,
            retry=False,
        )
    return GenerationEnded(
        500,
        task.error_code or "generation_failed",
        "server_error",
        f"{task.error_message or 'The generation failed'} (task {task.id}); nothing was charged",
        task.id,
        retry=True,  # a failed task costs nothing, so the SDK may try again
    )


async def _cancel_if_possible(
    request: Request[Any, Any, State], tenant_id: str, task_id: str
) -> bool:
    """Cancel the task and release its hold; False when it can no longer be cancelled."""
    try:
        async with asynccontextmanager(provide_uow)(request.app.state) as uow:
            await cancel_and_queue(uow, request.app.state.services, tenant_id, task_id)
    except Conflict:
        return False
    return True


async def _submit(
    request: Request[Any, Any, State],
    services: Services,
    principal: Principal,
    fields: dict[str, Any],
    webhook_url: str | None,
    idempotency_key: str | None,
) -> service.TaskView:
    """Submit like the unified door: committed and queued before the wait."""
    return await submit_and_queue(
        services,
        principal,
        fields=fields,
        webhook_url=webhook_url,
        idempotency_key=idempotency_key,
        api=API,
    )


async def _client_gone(request: Request[Any, Any, Any]) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _wait_or_leave(
    request: Request[Any, Any, State], services: Services, tenant_id: str, task_id: str
) -> tuple[TaskRecord, bool]:
    """The task when it ends, or as it is when the wait runs out or the client leaves
    (then True)."""
    seconds = services.settings.openai_wait_seconds
    waiter = asyncio.create_task(waiting.wait_for_task(services, tenant_id, task_id, seconds))
    gone = asyncio.create_task(_client_gone(request))
    try:
        await asyncio.wait((waiter, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
    if waiter.done():
        task = waiter.result()
        return task, not waiting.is_final(task)
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    logger.info("openai: client left while task %s ran", task_id, extra={"task_id": task_id})
    return await waiting.read_task(services, tenant_id, task_id), True


class OpenAIController(Controller):
    path = "/openai/v1"
    tags = ["openai"]
    dependencies = {"principal": Provide(provide_principal)}
    security = [{"bearerAuth": []}]
    exception_handlers = {Exception: openai_error}

    @post(
        "/images/generations",
        status_code=200,
        summary="Create images (OpenAI Images API)",
        responses=openai_error_responses(400, 401, 403, 404, 409, 413, 429, 500, 503, 504),
        description="OpenAI's request body, mapped onto the catalogue (docs/openai.md); the "
        "same limits, hold, Idempotency-Key and callbacks as `POST /v1/images/generations`. "
        "Answers when the generation ends, with `data[].url` (this gateway's signed links) or "
        "`data[].b64_json`. The task id and credits are in the `X-Tollgate-*` headers. Out of "
        "credits is 429 `insufficient_quota`. When the wait runs out or the client leaves, a "
        "cancellable task is cancelled and released; any other runs on and is charged, and the "
        "error names it so `GET /v1/tasks/{id}` can fetch it.",
    )
    async def create_images(
        self,
        request: Request[Any, Any, State],
        data: JSONBody[dict[str, Any]],
        principal: PrincipalDep,
        services: ServicesDep,
        webhook_url: Annotated[str | None, HeaderParameter(name="X-Webhook-URL")] = None,
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key")] = None,
    ) -> Response[OpenAIImagesResponse]:
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model", "is required: a model id from GET /openai/v1/models")
        entry = services.catalog.model(model)
        if entry is None:
            raise InvalidRequest(
                "model", f"unknown model {model!r}; GET /openai/v1/models lists your models"
            )
        mapped = unified_fields(entry, data)
        task = await _submit(
            request, services, principal, mapped.fields, webhook_url, idempotency_key
        )
        task, unfinished = await _wait_or_leave(request, services, principal.tenant_id, task.id)
        if unfinished:
            if await _cancel_if_possible(request, principal.tenant_id, task.id):
                raise GenerationEnded(
                    504,
                    "timeout",
                    "server_error",
                    f"The generation did not finish within {services.settings.openai_wait_seconds}"
                    f" seconds (or the client left); task {task.id} was cancelled and nothing "
                    "was charged",
                    task.id,
                    retry=False,
                )
            # Not cancellable now: it may have just ended, or it runs on and will be charged.
            task = await waiting.read_task(services, principal.tenant_id, task.id)
            if not waiting.is_final(task):
                raise GenerationEnded(
                    504,
                    "timeout",
                    "server_error",
                    f"The generation did not finish within {services.settings.openai_wait_seconds}"
                    f" seconds and cannot be cancelled: it runs on and will be charged. Fetch the "
                    f"result with GET /v1/tasks/{task.id} (task {task.id})",
                    task.id,
                    retry=False,
                )
        if task.status != TaskStatus.COMPLETED.value:
            raise _ended_without_images(task)
        return await self._images(services, task, mapped.response_format)

    async def _images(
        self, services: Services, task: TaskRecord, response_format: str
    ) -> Response[OpenAIImagesResponse]:
        rendered = service.render_task(task, services.signer)
        keys = task.results or []
        images: list[OpenAIImage] = []
        if response_format == "b64_json":
            for key in keys:
                data = await services.storage.get(key)
                if data is None:
                    raise GenerationEnded(
                        500,
                        "result_missing",
                        "server_error",
                        f"A result image of task {task.id} is missing from storage",
                        task.id,
                        retry=False,
                    )
                images.append(OpenAIImage(b64_json=base64.b64encode(data).decode()))
        else:
            images = [OpenAIImage(url=url) for url in rendered.results or []]
        body = OpenAIImagesResponse(
            created=int(task.created_at.timestamp()),
            data=images,
            size=_size_of(task.result_sizes),
            output_format=_format_of(keys),
        )
        headers = {
            TASK_HEADER: task.id,
            RESERVED_HEADER: str(credits_from_micros(task.credits_reserved_micros)),
            CHARGED_HEADER: str(credits_from_micros(task.credits_charged_micros or 0)),
        }
        response = json_response(body)
        response.headers.update(headers)
        return response

    @get(
        "/models",
        summary="List models (OpenAI Images API)",
        responses=openai_error_responses(401, 429, 503),
        description="The models this key may use, in OpenAI's list shape.",
    )
    async def list_models(
        self, principal: PrincipalDep, services: ServicesDep
    ) -> Response[OpenAIModelList]:
        path = services.settings.catalog_path or DEFAULT_CATALOG_PATH
        try:
            created = int(path.stat().st_mtime)
        except OSError:
            created = 0
        allowed = principal.allowed_models
        models = [
            OpenAIModel(id=entry.id, object="model", created=created, owned_by=entry.provider)
            for entry in services.catalog.models
            if allowed is None or entry.id in allowed
        ]
        return json_response(OpenAIModelList(object="list", data=models))


def _size_of(sizes: list[list[int]] | None) -> str | None:
    """``WxH`` of the images made (as the worker measured them), when they share one."""
    found = {(width, height) for width, height in sizes or ()}
    if len(found) != 1:
        return None
    width, height = found.pop()
    return f"{width}x{height}"


def _format_of(keys: list[str]) -> str | None:
    extensions = {key.rsplit(".", 1)[-1] for key in keys}
    if len(extensions) != 1:
        return None
    extension = extensions.pop()
    return "jpeg" if extension == "jpg" else extension
