"""The simulator's OpenAI Images protocol, synchronous, under ``/openai``.

Wire protocol (every error body is ``{"error": {"message", "type", "param", "code"}}``):

``POST /openai/v1/images/generations``, ``Authorization: Bearer <api key>``
    Body: ``model`` (required: ``gpt-image-1``, ``dall-e-3`` or ``dall-e-2``), ``prompt``
    (required string), ``n`` (int; 1..10, dall-e-3 only 1), ``size`` and ``quality`` from the
    model's table:

    ============  =======================================  ===========================
    model         size (default)                           quality (default)
    ============  =======================================  ===========================
    gpt-image-1   1024x1024, 1536x1024, 1024x1536, auto    low, medium, high, auto
                  (auto)                                   (auto)
    dall-e-3      1024x1024, 1792x1024, 1024x1792          standard, hd (standard)
                  (1024x1024)
    dall-e-2      256x256, 512x512, 1024x1024 (1024x1024)  standard (standard)
    ============  =======================================  ===========================

    "auto" renders 1024x1024. ``response_format`` (url|b64_json, default url) belongs to the
    DALL·E models; gpt-image-1 refuses it and always answers ``b64_json``, as OpenAI does.
    gpt-image-1 also takes ``output_format`` (png|jpeg|webp), ``output_compression``
    (0..100), ``background`` (transparent|opaque|auto) and ``moderation`` (low|auto);
    dall-e-3 takes ``style`` (vivid|natural); every model takes ``user`` (string). Images are
    PNG whatever ``output_format`` says. A field the model does not take is refused with 400
    ``unknown_parameter``, as OpenAI refuses it; JSON nulls count as absent.
    The answer comes once the generation is done, ``latency`` seconds after the request:
    200 ``{"created", "data": [{"b64_json"} | {"url"}, ...]}`` (dall-e-3 items add
    ``revised_prompt``) with ``n`` images at ``size``; 400 bad body; 401 bad key; 500
    ``server_error`` when the generation failed.

Links point at the shared image route; inline images count as served when they are sent.
"""

import base64
import re
import time
from dataclasses import dataclass
from typing import Any, Final

from litestar import Request, Response, Router, post
from litestar.exceptions import HTTPException

from workers.simulator.core import (
    Generation,
    InvalidRequest,
    Simulator,
    base_url,
    check_bearer,
    image_bytes,
    injected_fault,
    integer,
    json_body,
    until_final,
)

PREFIX: Final = "/openai"
# Cut off inside the first image, as a proxy dropping the rest of the body would do.
MALFORMED_BODY: Final = b'{"created": 1, "data": [{"b64_json": "iVBOR'
_WXH: Final = re.compile(r"([1-9][0-9]{1,4})x([1-9][0-9]{1,4})")
_COMMON: Final = frozenset({"model", "prompt", "n", "size", "quality", "user"})
_CHOICES: Final = {
    "response_format": ("url", "b64_json"),
    "output_format": ("png", "jpeg", "webp"),
    "background": ("transparent", "opaque", "auto"),
    "moderation": ("low", "auto"),
    "style": ("vivid", "natural"),
}


@dataclass(frozen=True)
class ImageModel:
    sizes: tuple[str, ...]
    default_size: str
    qualities: tuple[str, ...]
    default_quality: str
    max_n: int
    # Fields beyond the common ones this model takes.
    extra: frozenset[str]


MODELS: Final = {
    "gpt-image-1": ImageModel(
        ("1024x1024", "1536x1024", "1024x1536", "auto"),
        "auto",
        ("low", "medium", "high", "auto"),
        "auto",
        10,
        frozenset({"output_format", "output_compression", "background", "moderation"}),
    ),
    "dall-e-3": ImageModel(
        ("1024x1024", "1792x1024", "1024x1792"),
        "1024x1024",
        ("standard", "hd"),
        "standard",
        1,
        frozenset({"response_format", "style"}),
    ),
    "dall-e-2": ImageModel(
        ("256x256", "512x512", "1024x1024"),
        "1024x1024",
        ("standard",),
        "standard",
        10,
        frozenset({"response_format"}),
    ),
}


class InvalidParameter(InvalidRequest):
    def __init__(self, message: str, *, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class OpenAIRequest:
    model: str
    generation: Generation
    inline: bool


def parse_openai_request(body: object) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise InvalidParameter("body must be a JSON object", param=None)
    given = {key: value for key, value in body.items() if value is not None}
    model_id = given.get("model")
    if not isinstance(model_id, str) or model_id not in MODELS:
        raise InvalidParameter(
            f"model must be one of {', '.join(MODELS)}", param="model", code="invalid_value"
        )
    model = MODELS[model_id]
    for name in sorted(given):
        if name not in _COMMON and name not in model.extra:
            raise InvalidParameter(
                f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter"
            )
    prompt = given.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidParameter("prompt is required and must be a non-empty string", param="prompt")
    n = _integer("n", given.get("n", 1), 1, model.max_n)
    size = given.get("size", model.default_size)
    if size not in model.sizes:
        raise InvalidParameter(
            f"size must be one of {', '.join(model.sizes)} for {model_id}", param="size"
        )
    match = _WXH.fullmatch(size)
    width, height = (int(match[1]), int(match[2])) if match else (1024, 1024)
    if given.get("quality", model.default_quality) not in model.qualities:
        raise InvalidParameter(
            f"quality must be one of {', '.join(model.qualities)} for {model_id}",
            param="quality",
        )
    for name, choices in _CHOICES.items():
        if name in given and given[name] not in choices:
            raise InvalidParameter(f"{name} must be one of {', '.join(choices)}", param=name)
    if "output_compression" in given:
        _integer("output_compression", given["output_compression"], 0, 100)
    if not isinstance(given.get("user", ""), str):
        raise InvalidParameter("user must be a string", param="user")
    inline = "response_format" not in model.extra or given.get("response_format") == "b64_json"
    return OpenAIRequest(model_id, Generation(prompt, width, height, None, n), inline)


def _integer(name: str, value: object, low: int, high: int) -> int:
    try:
        return integer(name, value, low, high)
    except InvalidRequest as exc:
        raise InvalidParameter(str(exc), param=name) from None


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = "invalid_request_error"
    if status == 401:
        code = code or "invalid_api_key"
    elif status == 429:
        kind, code = "requests", code or "rate_limit_exceeded"
    elif status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def router(sim: Simulator) -> Router:
    @post("/v1/images/generations", status_code=200)
    async def generate(request: Request[Any, Any, Any]) -> Response[Any]:
        check_bearer(request, sim.config.api_key)
        sim.submits += 1
        if await injected_fault(sim):
            return Response(MALFORMED_BODY, media_type="application/json")
        try:
            wanted = parse_openai_request(await json_body(request))
        except InvalidParameter as exc:
            extra = {"param": exc.param, "code": exc.code}
            raise HTTPException(status_code=400, detail=str(exc), extra=extra) from None
        job = sim.submit(wanted.model, wanted.generation)
        await until_final(job)
        if job.fails:
            body = error_body(500, "The server had an error while processing your request.")
            return Response(body, status_code=500)
        items: list[dict[str, Any]]
        if wanted.inline:
            items = [
                {"b64_json": base64.b64encode(await image_bytes(sim, job, i)).decode()}
                for i in range(job.num_images)
            ]
        else:
            items = [{"url": url} for url in job.image_urls(base_url(request))]
        if wanted.model == "dall-e-3":
            items = [{**item, "revised_prompt": job.prompt} for item in items]
        return Response({"created": int(time.time()), "data": items})

    return Router(
        path=PREFIX, route_handlers=[generate], exception_handlers={HTTPException: _render}
    )


def _render(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    extra = exc.extra if isinstance(exc.extra, dict) else {}
    body = error_body(exc.status_code, exc.detail, param=extra.get("param"), code=extra.get("code"))
    return Response(body, status_code=exc.status_code, headers=exc.headers)
