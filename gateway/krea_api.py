"""A second front door that speaks the Krea 2 API (seeds/001), backed by the same tasks.

A client written for Krea 2 works against Tollgate by changing only its base URL::

    POST /generate/image/krea/krea-2/{medium|large}  -> {"job_id", "status": "queued", "created_at"}
    GET  /jobs/{job_id}                              -> the job object (below)
    DELETE /jobs/{job_id}                            -> the job object, cancelled

Rules:

- A request is translated to the unified fields (``aspect_ratio`` -> ``size``,
  ``resolution`` -> ``quality``, every other field by its own name; the variant
  picks the catalogue model from ``MODELS``) and goes through the one
  ``submit_generation``: the same key, rate limits, cap on tasks in flight,
  model access, key budgets, hold, ``Idempotency-Key`` and ``X-Webhook-URL`` as
  ``POST /v1/images/generations``. The task records ``api="krea"``.
- A job is a task: ``job_id`` is the task id. Any task of the caller's tenant
  reads here, whichever door it came through; another tenant's is 404, like an
  id that does not exist.
- ``render_krea_job`` is the one renderer of the job object, for
  ``GET /jobs/{id}`` and for the callback of a task that came through this door
  (``gateway/callbacks/service.py``)::

      {"job_id", "status": queued|processing|completed|failed|cancelled,
       "created_at", "completed_at": ISO 8601 | null,
       "result": {"urls": [...]}          (completed: Tollgate's signed links)
       "error": {"code", "message"}}      (failed)

- Errors keep the unified API's statuses, headers (``Retry-After``) and
  messages, with a field error naming the Krea field; only the body takes
  Krea's shape, ``{"error": "<message>", "code": "<code>"}``: a Krea client
  reads ``error`` as a string, and ``code`` is our additive machine name.
"""

import dataclasses
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Final

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody

from gateway.deps import PrincipalDep, ServicesDep, UnitOfWorkDep, provide_principal, provide_uow
from gateway.errors import InvalidRequest, NotFound, error_responses, exception_handler
from gateway.queue import enqueue_generation
from gateway.storage import UrlSigner
from gateway.tasks import cancel, service
from gateway.tasks.models import Task, TaskStatus
from gateway.tasks.schemas import JSON, json_response

API: Final = "krea"  # Task.api of the tasks this door creates

# The variant in the path -> the catalogue model it runs.
MODELS: Final[dict[str, str]] = {"medium": "krea-2-medium", "large": "krea-2-large"}

# Krea request fields that have another name in the unified request.
TO_UNIFIED: Final[dict[str, str]] = {"aspect_ratio": "size", "resolution": "quality"}
FROM_UNIFIED: Final[dict[str, str]] = {unified: krea for krea, unified in TO_UNIFIED.items()}

# Task status -> job status.
STATUSES: Final[dict[str, str]] = {
    TaskStatus.PENDING.value: "queued",
    TaskStatus.PROCESSING.value: "processing",
    TaskStatus.COMPLETED.value: "completed",
    TaskStatus.FAILED.value: "failed",
    TaskStatus.CANCELLED.value: "cancelled",
}


class KreaGeneration(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /generate/image/krea/krea-2/{variant}``: the request body of seeds/001."""

    prompt: str
    aspect_ratio: str | None = None
    resolution: str | None = None
    seed: int | None = None
    creativity: str | None = None
    image_style_references: list[Any] | None = None
    moodboards: list[Any] | None = None
    styles: list[Any] | None = None
    intensity: int | None = None
    complexity: int | None = None
    movement: int | None = None

    def unified_fields(self, model: str) -> dict[str, Any]:
        """The fields of ``POST /v1/images/generations`` this request stands for."""
        fields: dict[str, Any] = {"model": model}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if value is not None:  # an explicit null counts as not sent
                fields[TO_UNIFIED.get(name, name)] = value
        return fields


class KreaJobCreated(msgspec.Struct):
    job_id: str
    status: str
    created_at: str


class KreaResult(msgspec.Struct):
    urls: list[str]


class KreaJobError(msgspec.Struct):
    code: str
    message: str


class KreaJob(msgspec.Struct, omit_defaults=True):
    job_id: str
    status: str
    created_at: str
    completed_at: str | None  # no default: always present, null until the job is final
    result: KreaResult | None = None
    error: KreaJobError | None = None


class KreaErrorBody(msgspec.Struct):
    error: str
    code: str


def iso(moment: datetime) -> str:
    """UTC, milliseconds, ``Z``: ``2026-01-02T03:04:05.678Z``."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_krea_job(task: Task, signer: UrlSigner) -> KreaJob:
    """The Krea job object of a task, from whichever door it came."""
    status = task.status
    result = None
    if status == TaskStatus.COMPLETED.value and task.results and task.results_expire_at:
        expires_at = int(task.results_expire_at.timestamp())
        result = KreaResult(urls=[signer.url(key, expires_at) for key in task.results])
    error = None
    if status == TaskStatus.FAILED.value:
        error = KreaJobError(
            code=task.error_code or "generation_failed",
            message=task.error_message or "The generation failed",
        )
    final = status not in (TaskStatus.PENDING.value, TaskStatus.PROCESSING.value)
    return KreaJob(
        job_id=task.id,
        status=STATUSES[status],
        created_at=iso(task.created_at),
        completed_at=iso(task.finished_at) if final and task.finished_at else None,
        result=result,
        error=error,
    )


_encoder = msgspec.json.Encoder()


def krea_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The unified translator decides status, message and headers; Krea's body carries them."""
    unified = exception_handler(request, exc)
    detail = msgspec.json.decode(unified.content)["error"]
    return Response(
        content=_encoder.encode(KreaErrorBody(error=detail["message"], code=detail["code"])),
        status_code=unified.status_code,
        media_type=JSON,
        headers=unified.headers,
    )


def krea_error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    return {
        status: dataclasses.replace(spec, data_container=KreaErrorBody)
        for status, spec in error_responses(*statuses).items()
    }


class KreaController(Controller):
    path = "/"
    tags = ["krea-2"]
    dependencies = {"principal": Provide(provide_principal)}
    security = [{"bearerAuth": []}]
    exception_handlers = {Exception: krea_error}

    @post(
        "/generate/image/krea/krea-2/{variant:str}",
        status_code=200,
        dependencies={"uow": Provide(provide_uow)},
        summary="Create a Krea 2 job (Krea 2 API)",
        responses=krea_error_responses(400, 401, 402, 403, 404, 409, 413, 429, 503),
        description="`variant` is `medium` or `large` (models `krea-2-medium`, "
        "`krea-2-large`). The same task, limits and billing as "
        "`POST /v1/images/generations`; `aspect_ratio` is its `size` and `resolution` "
        "its `quality`. `X-Webhook-URL` receives the job object when the job ends. "
        "Poll `GET /jobs/{job_id}`.",
    )
    async def create_job(
        self,
        variant: FromPath[str],
        data: JSONBody[KreaGeneration],
        principal: PrincipalDep,
        services: ServicesDep,
        uow: UnitOfWorkDep,
        webhook_url: Annotated[str | None, HeaderParameter(name="X-Webhook-URL")] = None,
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key")] = None,
    ) -> Response[KreaJobCreated]:
        model = MODELS.get(variant)
        if model is None:
            raise NotFound(f"Unknown Krea 2 variant {variant!r}; use one of {', '.join(MODELS)}")
        try:
            submission = await service.submit_generation(
                uow.session,
                catalog=services.catalog,
                settings=services.settings,
                principal=principal,
                fields=data.unified_fields(model),
                webhook_url=webhook_url,
                idempotency_key=idempotency_key,
                api=API,
            )
        except InvalidRequest as exc:
            if exc.field not in FROM_UNIFIED:
                raise
            message = exc.message.removeprefix(f"{exc.field}: ")
            raise InvalidRequest(FROM_UNIFIED[exc.field], message) from None
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
        # An Idempotency-Key retry answers with the first job as it stands now.
        return json_response(
            KreaJobCreated(
                job_id=task.id, status=STATUSES[task.status], created_at=iso(task.created_at)
            )
        )

    @get(
        "/jobs/{job_id:str}",
        summary="Get a job (Krea 2 API)",
        description="Any task of yours, as a Krea job object; `result.urls` are signed, "
        "expiring links to the images.",
        responses=krea_error_responses(400, 401, 404, 429, 503),
    )
    async def get_job(
        self, job_id: FromPath[str], principal: PrincipalDep, services: ServicesDep
    ) -> Response[KreaJob]:
        async with services.sessions() as session:
            try:
                task = await service.get_tenant_task(session, principal.tenant_id, job_id)
            except NotFound:
                raise NotFound(f"Job not found: {job_id}") from None
        return json_response(render_krea_job(task, services.signer))

    @delete(
        "/jobs/{job_id:str}",
        status_code=200,
        dependencies={"uow": Provide(provide_uow)},
        summary="Cancel a job (Krea 2 API)",
        description="Cancels the job while it may be cancelled (queued, or running at an "
        "upstream that can stop it) and answers the job object, now `cancelled`; its reserved "
        "credits are released. 409 when the job is final or cannot be stopped.",
        responses=krea_error_responses(400, 401, 404, 409, 429, 503),
    )
    async def cancel_job(
        self,
        job_id: FromPath[str],
        principal: PrincipalDep,
        services: ServicesDep,
        uow: UnitOfWorkDep,
    ) -> Response[KreaJob]:
        try:
            task = await cancel.cancel_task(uow, services, principal.tenant_id, job_id)
        except NotFound:
            raise NotFound(f"Job not found: {job_id}") from None
        return json_response(render_krea_job(task, services.signer))
