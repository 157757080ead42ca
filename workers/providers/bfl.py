"""Black Forest Labs: ``POST /v1/<model>`` with ``x-key``, then GET the answer's ``polling_url``.

The body is ``prompt``, the size, ``seed`` (0 means "pick one": not sent), ``output_format``
("png") and the unified parameters in BFL's words: ``prompt_enhancement`` is
``prompt_upsampling``, ``nsfw_check`` the strictest ``safety_tolerance`` (0). The size goes as
``width`` and ``height`` (the catalogue's pixels) or, for a model whose catalogue entry says
``upstream_size = "aspect_ratio"`` (Ultra), as ``aspect_ratio`` (the size's name). One request
makes one image.

The submit answers ``{"id", "polling_url"}``. The polling URL is the job id Tollgate stores,
so a resumed run polls the same place; it must be on the channel's own host (scheme, host and
port of its base URL), at submit and at every poll, because the key goes with each poll.
Configure a regional base URL (``https://api.eu.bfl.ai``, ``https://api.us.bfl.ai``) when the
global one hands out polling URLs on regional hosts. An upstream that answers no
``polling_url`` is polled at ``<base>/v1/get_result?id=<id>``.

Poll statuses: ``Pending`` (running), ``Ready`` (``result.sample`` is the image link),
``Error`` / ``Failed`` (failed), ``Request Moderated`` / ``Content Moderated`` (failed, the
upstream's moderation), ``Task not found`` (the upstream lost the job: unavailable, as the
shared HTTP mapping reads a 404). BFL has no cancel.
"""

from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from pricing.request import ImageRequest
from workers.providers.base import (
    Endpoint,
    JobState,
    Submitted,
    UpstreamBadResult,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRejected,
)
from workers.providers.http import AccountClient

_FAILED = "the upstream could not generate the image"
_FAILURES = {
    "Error": _FAILED,
    "Failed": _FAILED,
    "Request Moderated": "the upstream's moderation refused the prompt",
    "Content Moderated": "the upstream's moderation withheld the image",
}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def bfl_error(body: object) -> bool:
    """BFL's error shape: ``{"detail": "<message>"}`` (a list of field errors for a 422)."""
    return isinstance(body, dict) and isinstance(body.get("detail"), str | list)


def bfl_body(request: ImageRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": request.prompt, "output_format": "png"}
    if request.upstream_size == "aspect_ratio":
        body["aspect_ratio"] = request.size
    else:
        body["width"], body["height"] = request.width, request.height
    seed = request.params.get("seed")
    if seed:
        body["seed"] = seed
    if "prompt_enhancement" in request.params:
        body["prompt_upsampling"] = bool(request.params["prompt_enhancement"])
    if request.params.get("nsfw_check"):
        body["safety_tolerance"] = 0
    return body


def _origin(url: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    return (parts.scheme.lower(), host, port) if host else None


class BflProvider:
    name = "bfl"
    supports_cancel = False

    def __init__(self, client: httpx.AsyncClient, endpoint: Endpoint) -> None:
        self._account = AccountClient(
            client,
            endpoint,
            "the Black Forest Labs upstream",
            auth_header=("x-key", endpoint.api_key),
            error_shape=bfl_error,
        )
        self._base = endpoint.base_url.rstrip("/")
        self._origin = _origin(endpoint.base_url)

    async def submit(self, upstream_model: str, request: ImageRequest) -> Submitted:
        body = await self._account.call(
            "POST", f"/v1/{quote(upstream_model)}", bfl_body(request), submit=True
        )
        polling_url = body.get("polling_url")
        if polling_url is None:
            job = body.get("id")
            if not isinstance(job, str) or not job:
                raise UpstreamProtocolError("the Black Forest Labs upstream returned no job id")
            polling_url = f"{self._base}/v1/get_result?id={quote(job, safe='')}"
        if not isinstance(polling_url, str):
            raise UpstreamProtocolError("the Black Forest Labs upstream returned no polling link")
        # Checked now, before the run records it: a link we would never poll is no job.
        return Submitted(job_id=self._checked(polling_url))

    async def poll(self, job_id: str) -> JobState:
        body = await self._account.call("GET", self._checked(job_id))
        status = body.get("status")
        if status == "Ready":
            result = body.get("result")
            sample = result.get("sample") if isinstance(result, dict) else None
            if not isinstance(sample, str) or not sample:
                raise UpstreamProtocolError(
                    "the Black Forest Labs upstream finished a job without an image"
                )
            return JobState(status="completed", progress=100, urls=(sample,))
        if status == "Pending":
            return JobState(status="processing", progress=50)
        if isinstance(status, str) and status in _FAILURES:
            return JobState(status="failed", error=_FAILURES[status])
        if status == "Task not found":
            # As a 404 would be: the upstream lost the job, which another channel may not.
            raise UpstreamNotFound("the Black Forest Labs upstream no longer knows the job")
        raise UpstreamProtocolError("the Black Forest Labs upstream returned an unknown status")

    async def cancel(self, job_id: str) -> None:
        raise UpstreamRejected("the Black Forest Labs upstream cannot cancel a job")

    def _checked(self, polling_url: str) -> str:
        """The polling URL, if it is on the channel's own host; refused otherwise (another
        channel may serve the task: the key is never sent off the configured host)."""
        if self._origin is None or _origin(polling_url) != self._origin:
            raise UpstreamBadResult(
                "the Black Forest Labs upstream gave a polling link off its configured host"
            )
        return polling_url
