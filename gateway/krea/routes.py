"""The Krea 2 door's routes (``gateway/krea/__init__.py`` has the rules).

``POST /generate/image/krea/krea-2/{variant}``, ``GET /jobs/{id}``, ``DELETE /jobs/{id}``;
errors keep the unified API's status and headers in Krea's body.
"""

import dataclasses
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody

from gateway.deps import PrincipalDep, ServicesDep, UnitOfWorkDep, provide_principal, provide_uow
from gateway.errors import InvalidRequest, NotFound
from gateway.krea.schemas import (
    API,
    FROM_UNIFIED,
    MODELS,
    STATUSES,
    KreaGeneration,
    KreaJob,
    KreaJobCreated,
    iso,
    render_krea_job,
)
from gateway.responses import JSON, error_responses, exception_handler, json_response
from gateway.tasks import service
from gateway.tasks.routes import cancel_and_queue, submit_and_queue


class KreaErrorBody(msgspec.Struct):
    error: str
    code: str


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
        webhook_url: Annotated[str | None, HeaderParameter(name="X-Webhook-URL")] = None,
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key")] = None,
    ) -> Response[KreaJobCreated]:
        model = MODELS.get(variant)
        if model is None:
            raise NotFound(f"Unknown Krea 2 variant {variant!r}; use one of {', '.join(MODELS)}")
        try:
            task = await submit_and_queue(
                services,
                principal,
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
            task = await cancel_and_queue(uow, services, principal.tenant_id, job_id)
        except NotFound:
            raise NotFound(f"Job not found: {job_id}") from None
        return json_response(render_krea_job(task, services.signer))
