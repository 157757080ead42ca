"""SiliconFlow-style synchronous generation (seeds/004): one ``POST /v1/images/generations``.

The unified ``size`` (``WxH``) is ``image_size``, ``n`` is ``batch_size``; steps,
negative prompt, seed and prompt enhancement pass through. The answer carries
the image URLs at once, so there is nothing to poll.
"""

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
from workers.providers.http import AccountClient


def siliconflow_error(body: object) -> bool:
    """SiliconFlow's error shape: ``{"code": <int>, "message": "..."}``."""
    if not isinstance(body, dict):
        return False
    code = body.get("code")
    return (
        isinstance(code, int)
        and not isinstance(code, bool)
        and isinstance(body.get("message"), str)
    )


def siliconflow_body(upstream_model: str, request: ImageRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": upstream_model,
        "prompt": request.prompt,
        "image_size": f"{request.width}x{request.height}",
        "batch_size": request.images,
    }
    if request.steps is not None:
        body["num_inference_steps"] = request.steps
    for name in ("negative_prompt", "prompt_enhancement"):
        if name in request.params:
            body[name] = request.params[name]
    seed = request.params.get("seed")
    if seed:
        body["seed"] = seed
    return body


class SiliconFlowProvider:
    name = "siliconflow"
    supports_cancel = False

    def __init__(self, client: httpx.AsyncClient, endpoint: Endpoint) -> None:
        self._account = AccountClient(
            client, endpoint, "the SiliconFlow upstream", error_shape=siliconflow_error
        )

    async def submit(self, upstream_model: str, request: ImageRequest) -> Submitted:
        body = await self._account.call(
            "POST", "/v1/images/generations", siliconflow_body(upstream_model, request), submit=True
        )
        images = body.get("images")
        if not isinstance(images, list) or not images:
            raise UpstreamProtocolError("the SiliconFlow upstream returned no images")
        urls = []
        for image in images:
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise UpstreamProtocolError(
                    "the SiliconFlow upstream returned an image without URL"
                )
            urls.append(url)
        return Submitted(state=JobState(status="completed", progress=100, urls=tuple(urls)))

    async def poll(self, job_id: str) -> JobState:
        raise UpstreamRejected("synchronous upstream: there is no job to poll")

    async def cancel(self, job_id: str) -> None:
        raise UpstreamRejected("synchronous upstream: there is no job to cancel")
