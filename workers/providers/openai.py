"""OpenAI Images, synchronous: one ``POST /v1/images/generations`` answers with the images.

The body is ``model``, ``prompt``, ``n`` (the request's image count), ``size`` as ``"WxH"``
(the catalogue's pixels) and ``quality`` (the catalogue's quality name, which is OpenAI's).
``response_format`` is not sent: GPT image models refuse the field ("Unknown parameter") and
always answer base64, while DALL·E models answer links by default. So the answer's ``data``
items are either ``{"b64_json"}``, decoded here into ``JobState.images`` for the worker to
store as they are, or ``{"url"}``, which the worker downloads like any other result link.
So the answer's cap is the endpoint's body cap plus ``n`` base64 images of the image cap.
Errors are ``{"error": {"message", "type", "param", "code"}}``.
"""

import base64
from typing import Any

import httpx

from pricing.request import ImageRequest
from workers.providers.base import (
    Endpoint,
    JobState,
    Submitted,
    UpstreamProtocolError,
    UpstreamRejected,
)
from workers.providers.http import AccountClient, message_error


def openai_body(upstream_model: str, request: ImageRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": upstream_model,
        "prompt": request.prompt,
        "n": request.images,
        "size": f"{request.width}x{request.height}",
    }
    if request.quality is not None:
        body["quality"] = request.quality
    return body


class OpenAIProvider:
    name = "openai"
    supports_cancel = False

    def __init__(self, client: httpx.AsyncClient, endpoint: Endpoint) -> None:
        self._account = AccountClient(
            client, endpoint, "the OpenAI upstream", error_shape=message_error
        )
        self._endpoint = endpoint

    async def submit(self, upstream_model: str, request: ImageRequest) -> Submitted:
        body = await self._account.call(
            "POST",
            "/v1/images/generations",
            openai_body(upstream_model, request),
            submit=True,
            # GPT image models answer the images inline, in base64.
            max_bytes=self._endpoint.inline_images_cap(request.images),
        )
        data = body.get("data")
        if not isinstance(data, list) or not data:
            raise UpstreamProtocolError("the OpenAI upstream returned no images")
        images: list[bytes] = []
        urls: list[str] = []
        for item in data:
            encoded = item.get("b64_json") if isinstance(item, dict) else None
            url = item.get("url") if isinstance(item, dict) else None
            if isinstance(encoded, str):
                images.append(_decoded(encoded))
            elif isinstance(url, str):
                urls.append(url)
            else:
                raise UpstreamProtocolError("the OpenAI upstream returned an image without data")
        state = JobState(status="completed", progress=100, urls=tuple(urls), images=tuple(images))
        return Submitted(state=state)

    async def poll(self, job_id: str) -> JobState:
        raise UpstreamRejected("synchronous upstream: there is no job to poll")

    async def cancel(self, job_id: str) -> None:
        raise UpstreamRejected("synchronous upstream: there is no job to cancel")


def _decoded(encoded: str) -> bytes:
    try:
        data = base64.b64decode(encoded, validate=True)
    except ValueError:  # binascii.Error, or characters outside ASCII
        raise UpstreamProtocolError(
            "the OpenAI upstream sent an image that is not base64"
        ) from None
    if not data:
        raise UpstreamProtocolError("the OpenAI upstream sent an empty image")
    return data
