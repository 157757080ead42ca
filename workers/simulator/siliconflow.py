"""The simulator's SiliconFlow-style protocol: one synchronous call per generation.

Wire protocol (every error body is ``{"code": <int>, "message": "<message>", "data": null}``):

``POST /v1/images/generations``, ``Authorization: Bearer <api key>``
    Body: ``model`` (required; any id with a "/", such as ``black-forest-labs/FLUX.1-schnell``),
    ``prompt`` (required string), ``image_size`` (required ``"WxH"``, each side 64..4096),
    ``batch_size`` (int 1..4, default 1), ``num_inference_steps`` (int 1..100, default 20),
    ``negative_prompt`` (string), ``seed`` (int 0..9999999999), ``prompt_enhancement`` (bool),
    ``guidance_scale`` (a number, accepted and ignored). Unknown fields and JSON nulls are ignored.
    The answer comes once the generation is done, ``latency`` seconds after the request:
    200 ``{"images": [{"url"}, ...], "timings": {"inference": <seconds>}, "seed": <seed used>}``
    with ``batch_size`` images rendered at ``image_size``; 400 bad body; 401 bad key;
    500 with ``code`` 50603 when the generation failed.

Rules:
- ``code`` is the HTTP status times 100 (40000, 40100, 42900, 50000), except
  ``GENERATION_FAILED`` for a generation that ran and failed. The numbers are the simulator's
  own; SiliconFlow documents the shape, and Tollgate's adapter reads only the HTTP status.
- Steps shape nothing here: a picture is a function of prompt, seed, index and size. The
  upstream runs FLUX.1-schnell and SD 3.5 large turbo at a fixed 4 steps whatever is sent, so
  the simulator only checks the range.

``router`` serves it with the shared core (``workers.simulator.core``): job store, knobs,
counters.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from litestar import Request, Response, Router, post
from litestar.exceptions import HTTPException

from workers.simulator.core import (
    Generation,
    Simulator,
    base_url,
    check_bearer,
    injected_fault,
    json_body,
    until_final,
)

ROUTE: Final = "/v1/images/generations"
GENERATION_FAILED: Final = 50603
MAX_SEED: Final = 9_999_999_999
MIN_SIDE: Final = 64
MAX_SIDE: Final = 4096
MAX_BATCH: Final = 4

# Cut off inside the first URL, as a proxy dropping the rest of the body would do.
MALFORMED_BODY: Final = b'{"images": [{"url": "'
_IMAGE_SIZE: Final = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


class InvalidBody(ValueError):
    """A generations body that breaks the protocol; the message names the field."""


@dataclass(frozen=True)
class ImagesRequest:
    """A validated body, reduced to what shapes the answer."""

    model: str
    prompt: str
    width: int
    height: int
    batch_size: int
    steps: int
    seed: int | None


def parse_images_request(body: object) -> ImagesRequest:
    if not isinstance(body, dict):
        raise InvalidBody("body must be a JSON object")
    given = {key: value for key, value in body.items() if value is not None}
    model = given.get("model")
    if not isinstance(model, str) or "/" not in model.strip("/"):
        raise InvalidBody("model is required, as an id such as black-forest-labs/FLUX.1-schnell")
    prompt = given.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidBody("prompt is required and must be a non-empty string")
    image_size = given.get("image_size")
    match = _IMAGE_SIZE.fullmatch(image_size) if isinstance(image_size, str) else None
    if match is None:
        raise InvalidBody("image_size is required, as WIDTHxHEIGHT such as 1024x1024")
    width, height = int(match[1]), int(match[2])
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise InvalidBody(f"image_size: each side must be between {MIN_SIDE} and {MAX_SIDE}")
    batch_size = _integer("batch_size", given.get("batch_size", 1), 1, MAX_BATCH)
    steps = _integer("num_inference_steps", given.get("num_inference_steps", 20), 1, 100)
    seed = _integer("seed", given["seed"], 0, MAX_SEED) if "seed" in given else None
    if not isinstance(given.get("negative_prompt", ""), str):
        raise InvalidBody("negative_prompt must be a string")
    if not isinstance(given.get("prompt_enhancement", False), bool):
        raise InvalidBody("prompt_enhancement must be true or false")
    guidance_scale = given.get("guidance_scale", 0)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float):
        raise InvalidBody("guidance_scale must be a number")
    return ImagesRequest(model, prompt, width, height, batch_size, steps, seed)


def images_body(urls: Sequence[str], *, seconds: float, seed: int) -> dict[str, Any]:
    return {
        "images": [{"url": url} for url in urls],
        "timings": {"inference": seconds},
        "seed": seed,
    }


def error_body(status: int, message: str, *, code: int | None = None) -> dict[str, Any]:
    return {"code": status * 100 if code is None else code, "message": message, "data": None}


def _integer(name: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass in Python, but `true` is not a number on the wire.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidBody(f"{name} must be an integer")
    if not low <= value <= high:
        raise InvalidBody(f"{name} must be between {low} and {high}")
    return value


def router(sim: Simulator) -> Router:
    @post(ROUTE, status_code=200)
    async def generate(request: Request[Any, Any, Any]) -> Response[Any]:
        check_bearer(request, sim.config.api_key)
        sim.submits += 1
        if await injected_fault(sim):
            return Response(MALFORMED_BODY, media_type="application/json")
        try:
            wanted = parse_images_request(await json_body(request))
        except InvalidBody as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        generation = Generation(
            wanted.prompt, wanted.width, wanted.height, wanted.seed, wanted.batch_size
        )
        job = sim.submit(wanted.model, generation)
        await until_final(job)
        if job.fails:
            return _error(500, "generation failed", code=GENERATION_FAILED)
        urls = job.image_urls(base_url(request))
        return Response(images_body(urls, seconds=job.latency, seed=job.seed))

    return Router(path="/", route_handlers=[generate], exception_handlers={HTTPException: _render})


def _render(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _error(exc.status_code, exc.detail, headers=exc.headers)


def _error(
    status: int,
    message: str,
    *,
    code: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response[Any]:
    return Response(error_body(status, message, code=code), status_code=status, headers=headers)
