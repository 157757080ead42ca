"""The simulator's Black Forest Labs protocol, under ``/bfl``: submit, then poll a link.

Wire protocol (every error body is ``{"detail": "<message>"}``; the key goes in ``x-key``):

``POST /bfl/v1/{model}``, ``x-key: <api key>``
    ``flux-pro-1.1``, ``flux-pro`` and ``flux-dev`` take ``width`` and ``height`` (each
    256..1440, a multiple of 32; default 1024x768). ``flux-pro-1.1-ultra`` takes
    ``aspect_ratio`` (``"W:H"`` of whole numbers, from 21:9 to 9:21; default "16:9") and
    ``raw`` (bool), and renders the longer side at 2048 px and the shorter keeping the
    ratio, rounded down to a multiple of 32 (1:1 is 2048x2048, 16:9 2048x1152, 21:9
    2048x864). Sending a model the other size form is refused. Every model takes ``prompt``
    (required string), ``seed`` (int 0..2**63-1), ``prompt_upsampling`` (bool),
    ``safety_tolerance`` (int 0..6), ``output_format`` (jpeg|png; images are PNG whatever it
    says), ``webhook_url`` / ``webhook_secret`` / ``image_prompt`` (strings, accepted and
    ignored). Other fields and JSON nulls are ignored. One image per request.
    200 ``{"id", "polling_url": "<base>/bfl/v1/get_result?id=<id>"}``; 400 bad body;
    401 bad key; 404 unknown model.
``GET /bfl/v1/get_result?id=<id>`` (x-key)
    200 ``{"id", "status", "result", "progress"}``: status "Pending" while the job is
    queued or running, "Ready" with ``"result": {"sample": <link>, "prompt", "seed"}``,
    "Error" when it failed; 404 ``{"id", "status": "Task not found", "result": null}``.
"""

import time
from dataclasses import dataclass
from typing import Any, Final

from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath

from workers.simulator.core import (
    Generation,
    InvalidRequest,
    Job,
    Simulator,
    base_url,
    check_key,
    injected_fault,
    integer,
    json_body,
    poll_fault,
)

PREFIX: Final = "/bfl"
WIDTH_HEIGHT_MODELS: Final = frozenset({"flux-pro-1.1", "flux-pro", "flux-dev"})
ASPECT_RATIO_MODELS: Final = frozenset({"flux-pro-1.1-ultra"})
MIN_SIDE: Final = 256
MAX_SIDE: Final = 1440
MULTIPLE: Final = 32
ULTRA_LONG_SIDE: Final = 2048
MAX_SEED: Final = 2**63 - 1
# Cut off inside the id, as a proxy dropping the rest of the body would do.
MALFORMED_BODY: Final = b'{"id": "'
_STATUSES: Final = {"queued": "Pending", "processing": "Pending", "completed": "Ready"}


@dataclass(frozen=True)
class BflRequest:
    generation: Generation


def parse_bfl_request(model: str, body: object) -> BflRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    given = {key: value for key, value in body.items() if value is not None}
    prompt = given.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("prompt is required and must be a non-empty string")
    if model in ASPECT_RATIO_MODELS:
        for name in ("width", "height"):
            if name in given:
                raise InvalidRequest(f"{name} is not a parameter of {model}: send aspect_ratio")
        width, height = ultra_size(given.get("aspect_ratio", "16:9"))
        if not isinstance(given.get("raw", False), bool):
            raise InvalidRequest("raw must be true or false")
    else:
        for name in ("aspect_ratio", "raw"):
            if name in given:
                raise InvalidRequest(f"{name} is not a parameter of {model}: send width and height")
        width = _side("width", given.get("width", 1024))
        height = _side("height", given.get("height", 768))
    seed = integer("seed", given["seed"], 0, MAX_SEED) if "seed" in given else None
    if not isinstance(given.get("prompt_upsampling", False), bool):
        raise InvalidRequest("prompt_upsampling must be true or false")
    if "safety_tolerance" in given:
        integer("safety_tolerance", given["safety_tolerance"], 0, 6)
    if given.get("output_format", "jpeg") not in ("jpeg", "png"):
        raise InvalidRequest("output_format must be jpeg or png")
    for name in ("webhook_url", "webhook_secret", "image_prompt"):
        if not isinstance(given.get(name, ""), str):
            raise InvalidRequest(f"{name} must be a string")
    return BflRequest(Generation(prompt, width, height, seed, 1))


def ultra_size(aspect_ratio: object) -> tuple[int, int]:
    """Ultra's pixels for an aspect ratio: the longer side 2048, the shorter in proportion."""
    wide, _, high = aspect_ratio.partition(":") if isinstance(aspect_ratio, str) else ("", "", "")
    if not (wide.isdigit() and high.isdigit() and int(wide) > 0 and int(high) > 0):
        raise InvalidRequest("aspect_ratio must be W:H in whole numbers, such as 16:9")
    w, h = int(wide), int(high)
    if not 9 * w <= 21 * h or not 9 * h <= 21 * w:
        raise InvalidRequest("aspect_ratio must be between 21:9 and 9:21")
    if w >= h:
        return ULTRA_LONG_SIDE, ULTRA_LONG_SIDE * h // w // MULTIPLE * MULTIPLE
    return ULTRA_LONG_SIDE * w // h // MULTIPLE * MULTIPLE, ULTRA_LONG_SIDE


def _side(name: str, value: object) -> int:
    side = integer(name, value, MIN_SIDE, MAX_SIDE)
    if side % MULTIPLE:
        raise InvalidRequest(f"{name} must be a multiple of {MULTIPLE}")
    return side


def result_body(job: Job, base: str) -> dict[str, Any]:
    status = job.status(time.monotonic())
    body: dict[str, Any] = {
        "id": job.id,
        "status": _STATUSES.get(status, "Error"),
        "result": None,
        "progress": None,
    }
    if status == "completed":
        [sample] = job.image_urls(base)
        body["result"] = {"sample": sample, "prompt": job.prompt, "seed": job.seed}
    return body


def router(sim: Simulator) -> Router:
    def authorize(request: Request[Any, Any, Any]) -> None:
        key = request.headers.get("x-key")
        if not key:
            raise HTTPException(status_code=401, detail="missing x-key header")
        check_key(key, sim.config.api_key)

    @post("/v1/{model:str}", status_code=200)
    async def submit(request: Request[Any, Any, Any], model: FromPath[str]) -> Response[Any]:
        authorize(request)
        sim.submits += 1
        if await injected_fault(sim):
            return Response(MALFORMED_BODY, media_type="application/json")
        if model not in WIDTH_HEIGHT_MODELS | ASPECT_RATIO_MODELS:
            raise HTTPException(status_code=404, detail=f"no model {model}")
        try:
            wanted = parse_bfl_request(model, await json_body(request))
        except InvalidRequest as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        job = sim.submit(model, wanted.generation)
        polling_url = f"{base_url(request)}{PREFIX}/v1/get_result?id={job.id}"
        return Response({"id": job.id, "polling_url": polling_url})

    @get("/v1/get_result")
    async def get_result(request: Request[Any, Any, Any]) -> Response[Any]:
        authorize(request)
        job_id = request.query_params.get("id")
        if not job_id:
            raise HTTPException(status_code=400, detail="id is required")
        sim.polls += 1
        await poll_fault(sim)
        job = sim.jobs.get(job_id)
        if job is None:
            body = {"id": job_id, "status": "Task not found", "result": None, "progress": None}
            return Response(body, status_code=404)
        return Response(result_body(job, base_url(request)))

    return Router(
        path=PREFIX,
        route_handlers=[submit, get_result],
        exception_handlers={HTTPException: _render},
    )


def _render(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return Response({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
