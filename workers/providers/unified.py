"""The unified API of seeds/002 as an upstream: another Tollgate, or any gateway speaking it.

``POST /v1/images/generations`` answers a task object with an ``id``; ``GET /v1/tasks/{id}``
polls it (``results`` holds the image links once completed); ``POST /v1/tasks/{id}/cancel``
cancels it. Cancel is Tollgate's own extension: an upstream answering 404 or 405 there has no
cancel, and 409 says the task is already final; all three are ``UpstreamRejected``. A 2xx
counts only when its body is the task object showing ``cancelled``: an upstream answering 200
with the task still ``processing`` has not cancelled it. Errors are the envelope
``{"error": {"code", "message", "type"}}``.

The request goes on in the same words it came in: ``model`` is the channel's upstream model
id, ``size`` and ``quality`` are the unified ones, and every catalogue parameter passes under
its own name (``n`` among them when the model declares it). ``callback_url`` is never sent:
the callback belongs to Tollgate's tenant, and Tollgate polls.
"""

import re
from typing import Any
from urllib.parse import quote

import httpx

from pricing.request import ImageRequest
from workers.providers.base import (
    Endpoint,
    JobState,
    JobStatus,
    Submitted,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from workers.providers.http import (
    AccountClient,
    confirm_cancelled,
    decode_json,
    message_error,
    read_capped,
    status_error,
)

_LABEL = "the unified upstream"
# Never forwarded, whatever the catalogue says: the upstream must not call our tenant.
NEVER_SENT = frozenset({"callback_url"})
_STATUSES: dict[str, JobStatus] = {
    "pending": "pending",
    "processing": "processing",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}
# A task id goes into our URL paths: nothing that could step out of them.
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}")


def unified_body(upstream_model: str, request: ImageRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": upstream_model, "prompt": request.prompt, "size": request.size}
    if request.quality is not None:
        body["quality"] = request.quality
    for name, value in request.params.items():
        if name not in NEVER_SENT and value is not None:
            body[name] = value
    return body


class UnifiedProvider:
    name = "unified"
    supports_cancel = True

    def __init__(self, client: httpx.AsyncClient, endpoint: Endpoint) -> None:
        self._account = AccountClient(client, endpoint, _LABEL, error_shape=message_error)
        self._client = client
        self._endpoint = endpoint
        self._base = endpoint.base_url.rstrip("/")

    async def submit(self, upstream_model: str, request: ImageRequest) -> Submitted:
        body = await self._account.call(
            "POST", "/v1/images/generations", unified_body(upstream_model, request), submit=True
        )
        task_id = body.get("id")
        if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
            raise UpstreamProtocolError(f"{_LABEL} returned no usable task id")
        return Submitted(job_id=task_id)

    async def poll(self, job_id: str) -> JobState:
        body = await self._account.call("GET", f"/v1/tasks/{quote(job_id, safe='')}")
        status = _STATUSES.get(str(body.get("status")))
        if status is None:
            raise UpstreamProtocolError(f"{_LABEL} returned an unknown task status")
        if status == "completed":
            results = body.get("results")
            if (
                not isinstance(results, list)
                or not results
                or not all(isinstance(url, str) for url in results)
            ):
                raise UpstreamProtocolError(f"{_LABEL} completed a task without images")
            return JobState(status="completed", progress=100, urls=tuple(results))
        if status == "failed":
            # The upstream's own message stays there: it may name its internals.
            return JobState(status="failed", error="the upstream could not generate the image")
        return JobState(status=status, progress=_progress(body.get("progress"), status))

    async def cancel(self, job_id: str) -> None:
        # Its own call, not AccountClient's: the shared mapping reads 404 and 405 as a channel
        # pointing at the wrong place, while here they say the upstream has no cancel route.
        url = f"{self._base}/v1/tasks/{quote(job_id, safe='')}/cancel"
        endpoint = self._endpoint
        headers = {"Authorization": f"Bearer {endpoint.api_key}"}
        try:
            async with self._client.stream(
                "POST",
                url,
                headers=headers,
                timeout=endpoint.poll_timeout,
                follow_redirects=False,
            ) as response:
                status = response.status_code
                if status in (404, 405, 409):
                    # No cancel route at all, or the task is already final.
                    raise UpstreamRejected(f"{_LABEL} cannot cancel this task (HTTP {status})")
                error = status_error(response, _LABEL)
                if error is not None:
                    raise error
                if status >= 400:
                    raise UpstreamRejected(f"{_LABEL} refused to cancel the task (HTTP {status})")
                data = await read_capped(response, endpoint.max_body_bytes, _LABEL)
        except httpx.TimeoutException:
            raise UpstreamUnavailable(f"{_LABEL} did not answer in time", timed_out=True) from None
        except httpx.TransportError:
            raise UpstreamUnavailable(f"{_LABEL} could not be reached") from None
        body = decode_json(data)
        shown = _STATUSES.get(str(body.get("status"))) if isinstance(body, dict) else None
        confirm_cancelled(shown, _LABEL)


def _progress(value: object, status: JobStatus) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100:
        return value
    return 50 if status == "processing" else 10
