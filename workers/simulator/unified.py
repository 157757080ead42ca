"""The simulator's unified protocol: seeds/002 as Tollgate itself serves it, under ``/unified``.

Wire protocol (every error body is ``{"error": {"code", "message", "type"}}``, the envelope of
seeds/002):

``POST /unified/v1/images/generations``, ``Authorization: Bearer <api key>``
    Body: ``model`` (required, any non-empty id), ``prompt`` (required string), ``size``:
    either an aspect ratio of the size table (``workers.simulator.sizes``, default "1:1")
    with ``quality`` "1K", "2K" or "4K" (default "1K"), or ``"WxH"`` pixels (each side
    64..4096) without ``quality``. ``n`` (int 1..4; without it the per-model table of the
    config decides), ``seed`` (int 0..9999999999), ``negative_prompt`` (string),
    ``num_inference_steps`` (int 1..100), ``nsfw_check`` / ``prompt_enhancement`` (bool),
    ``creativity`` (raw|low|medium|high), ``image_style_references`` / ``styles`` /
    ``moodboards`` (arrays, at most 1 moodboard), ``intensity`` / ``complexity`` /
    ``movement`` (int -100..100), ``callback_url`` (an https URL; accepted, never called).
    JSON nulls count as absent; any other field is refused, as Tollgate refuses it.
    200 the task object, ``status`` "pending"; 400 bad body; 401 bad key.
``GET /unified/v1/tasks/{id}`` (Bearer)
    200 the task object: ``{"created", "id", "model", "object": "image.generation.task",
    "progress", "status", "task_info": {"can_cancel": true, "estimated_time"}, "type":
    "image", "usage": {"billing_rule", "credits_reserved", "user_group"}}``, plus ``"results":
    [links]`` when completed or ``"error": {"code", "message"}`` when failed; 404.
``POST /unified/v1/tasks/{id}/cancel`` (Bearer), Tollgate's extension
    200 the task object, now cancelled; 409 when the task is already final; 404.

Statuses: a job queued is "pending" (progress 0), then "processing" (50), then "completed"
(100), "failed" or "cancelled". Result links are the simulator's shared image route.
"""

import math
import re
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
    cancel_ignored,
    check_bearer,
    injected_fault,
    integer,
    json_body,
    poll_fault,
)
from workers.simulator.sizes import ASPECT_RATIOS, RESOLUTIONS, image_size

PREFIX: Final = "/unified"
FIELDS: Final = frozenset(
    {
        "model",
        "prompt",
        "size",
        "quality",
        "seed",
        "nsfw_check",
        "callback_url",
        "n",
        "negative_prompt",
        "num_inference_steps",
        "prompt_enhancement",
        "creativity",
        "image_style_references",
        "moodboards",
        "styles",
        "intensity",
        "complexity",
        "movement",
    }
)
MAX_SEED: Final = 9_999_999_999
MIN_SIDE: Final = 64
MAX_SIDE: Final = 4096
CREATIVITY: Final = ("raw", "low", "medium", "high")
_STATUSES: Final = {"queued": "pending"}
_PROGRESS: Final = {"queued": 0, "processing": 50, "completed": 100}
_WXH: Final = re.compile(r"([1-9][0-9]{1,4})x([1-9][0-9]{1,4})")
# Cut off inside the task id, as a proxy dropping the rest of the body would do.
MALFORMED_BODY: Final = b'{"id": "'
_ERROR_CODES: Final = {
    400: ("invalid_request", "invalid_request_error"),
    401: ("unauthorized", "authentication_error"),
    403: ("forbidden", "permission_error"),
    404: ("not_found", "invalid_request_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    409: ("conflict", "invalid_request_error"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
}


@dataclass(frozen=True)
class UnifiedRequest:
    model: str
    generation: Generation


def parse_unified_request(body: object) -> UnifiedRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    given = {key: value for key, value in body.items() if value is not None}
    unknown = sorted(set(given) - FIELDS)
    if unknown:
        raise InvalidRequest(f"{unknown[0]} is not a field of this API")
    model = given.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model is required and must be a non-empty string")
    prompt = given.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("prompt is required and must be a non-empty string")
    width, height = _size(given.get("size", "1:1"), given.get("quality"))
    n = integer("n", given["n"], 1, 4) if "n" in given else None
    seed = integer("seed", given["seed"], 0, MAX_SEED) if "seed" in given else None
    if "num_inference_steps" in given:
        integer("num_inference_steps", given["num_inference_steps"], 1, 100)
    for name in ("nsfw_check", "prompt_enhancement"):
        if not isinstance(given.get(name, False), bool):
            raise InvalidRequest(f"{name} must be true or false")
    if not isinstance(given.get("negative_prompt", ""), str):
        raise InvalidRequest("negative_prompt must be a string")
    if given.get("creativity", "medium") not in CREATIVITY:
        raise InvalidRequest(f"creativity must be one of {', '.join(CREATIVITY)}")
    for name in ("image_style_references", "moodboards", "styles"):
        if not isinstance(given.get(name, []), list):
            raise InvalidRequest(f"{name} must be an array")
    if len(given.get("moodboards", [])) > 1:
        raise InvalidRequest("moodboards accepts at most 1 moodboard per request")
    for name in ("intensity", "complexity", "movement"):
        if name in given:
            integer(name, given[name], -100, 100)
    callback_url = given.get("callback_url", "https://")
    if not isinstance(callback_url, str) or not callback_url.startswith("https://"):
        raise InvalidRequest("callback_url must be an https URL")
    return UnifiedRequest(model, Generation(prompt, width, height, seed, n))


def _size(size: object, quality: object) -> tuple[int, int]:
    if not isinstance(size, str):
        raise InvalidRequest("size must be a string")
    match = _WXH.fullmatch(size)
    if match is not None:
        if quality is not None:
            raise InvalidRequest("quality is not accepted with a WxH size")
        width, height = int(match[1]), int(match[2])
        if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
            raise InvalidRequest(f"size: each side must be between {MIN_SIDE} and {MAX_SIDE}")
        return width, height
    if size not in ASPECT_RATIOS:
        raise InvalidRequest(f"size must be WIDTHxHEIGHT or one of {', '.join(ASPECT_RATIOS)}")
    quality = "1K" if quality is None else quality
    if quality not in RESOLUTIONS:
        raise InvalidRequest(f"quality must be one of {', '.join(RESOLUTIONS)}")
    pixels = image_size(size, str(quality))
    if pixels is None:
        raise InvalidRequest(f"size {size} is not offered at {quality}")
    return pixels


def task_object(job: Job, base: str) -> dict[str, Any]:
    status = job.status(time.monotonic())
    body: dict[str, Any] = {
        "created": int(job.created_at.timestamp()),
        "id": job.id,
        "model": job.model_path,
        "object": "image.generation.task",
        "progress": _PROGRESS.get(status, 0),
        "status": _STATUSES.get(status, status),
        "task_info": {"can_cancel": True, "estimated_time": math.ceil(job.latency)},
        "type": "image",
        "usage": {"billing_rule": "per_call", "credits_reserved": 0, "user_group": "default"},
    }
    if status == "completed":
        body["results"] = job.image_urls(base)
    elif status == "failed":
        body["error"] = {"code": "generation_failed", "message": "simulated generation failure"}
    return body


def error_body(status: int, message: str) -> dict[str, Any]:
    code, kind = _ERROR_CODES.get(status, ("internal_error", "api_error"))
    return {"error": {"code": code, "message": message, "type": kind}}


def router(sim: Simulator) -> Router:
    @post("/v1/images/generations", status_code=200)
    async def submit(request: Request[Any, Any, Any]) -> Response[Any]:
        check_bearer(request, sim.config.api_key)
        sim.submits += 1
        if await injected_fault(sim):
            return Response(MALFORMED_BODY, media_type="application/json")
        try:
            wanted = parse_unified_request(await json_body(request))
        except InvalidRequest as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        job = sim.submit(wanted.model, wanted.generation)
        return Response(task_object(job, base_url(request)))

    @get("/v1/tasks/{task_id:str}")
    async def poll(request: Request[Any, Any, Any], task_id: FromPath[str]) -> dict[str, Any]:
        check_bearer(request, sim.config.api_key)
        sim.polls += 1
        await poll_fault(sim)
        return task_object(sim.job(task_id), base_url(request))

    @post("/v1/tasks/{task_id:str}/cancel", status_code=200)
    async def cancel(request: Request[Any, Any, Any], task_id: FromPath[str]) -> dict[str, Any]:
        check_bearer(request, sim.config.api_key)
        if cancel_ignored(sim):
            return task_object(sim.job(task_id), base_url(request))
        return task_object(sim.cancel(task_id), base_url(request))

    return Router(
        path=PREFIX,
        route_handlers=[submit, poll, cancel],
        exception_handlers={HTTPException: _render},
    )


def _render(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return Response(
        error_body(exc.status_code, exc.detail), status_code=exc.status_code, headers=exc.headers
    )
