"""Krea 2 async jobs (seeds/001): ``POST /generate/image/<model>``, then ``GET /jobs/<id>``.

The unified ``size`` is Krea's ``aspect_ratio`` and ``quality`` its
``resolution``; the Krea 2 fields pass through under their own names. Errors are
``{"error": "<message>"}``; ``DELETE /jobs/<id>`` answers the job, which must show
``cancelled`` for the cancel to count.
"""

from typing import Any

import httpx

from pricing.request import ImageRequest
from workers.providers.base import Endpoint, JobState, JobStatus, Submitted, UpstreamProtocolError
from workers.providers.http import AccountClient, confirm_cancelled

# Request parameters Krea takes under the same name as the unified API.
PASSED_THROUGH = (
    "seed",
    "creativity",
    "image_style_references",
    "moodboards",
    "styles",
    "intensity",
    "complexity",
    "movement",
)
_STATUSES: dict[str, JobStatus] = {
    "queued": "pending",
    "pending": "pending",
    "processing": "processing",
    "running": "processing",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


def krea_error(body: object) -> bool:
    """Krea's error shape: ``{"error": "<message>"}``."""
    return isinstance(body, dict) and isinstance(body.get("error"), str)


def krea_body(request: ImageRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": request.prompt, "aspect_ratio": request.size}
    if request.quality is not None:
        body["resolution"] = request.quality
    for name in PASSED_THROUGH:
        value = request.params.get(name)
        # seed 0 means "pick one" in the unified API: let Krea pick.
        if value is not None and not (name == "seed" and value == 0):
            body[name] = value
    return body


class KreaProvider:
    name = "krea"
    supports_cancel = True

    def __init__(self, client: httpx.AsyncClient, endpoint: Endpoint) -> None:
        self._account = AccountClient(client, endpoint, "the Krea upstream", error_shape=krea_error)

    async def submit(self, upstream_model: str, request: ImageRequest) -> Submitted:
        body = await self._account.call(
            "POST", f"/generate/image/{upstream_model}", krea_body(request), submit=True
        )
        job_id = body.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise UpstreamProtocolError("the Krea upstream returned no job id")
        return Submitted(job_id=job_id)

    async def poll(self, job_id: str) -> JobState:
        body = await self._account.call("GET", f"/jobs/{job_id}")
        status = _STATUSES.get(str(body.get("status")))
        if status is None:
            raise UpstreamProtocolError("the Krea upstream returned an unknown job status")
        if status == "completed":
            result = body.get("result") or {}
            urls = result.get("urls") if isinstance(result, dict) else None
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                raise UpstreamProtocolError("the Krea upstream completed a job without images")
            return JobState(status="completed", progress=100, urls=tuple(urls))
        if status == "failed":
            return JobState(status="failed", error="the upstream could not generate the image")
        return JobState(status=status, progress=50 if status == "processing" else 10)

    async def cancel(self, job_id: str) -> None:
        body = await self._account.call("DELETE", f"/jobs/{job_id}")
        # The answer is the job: cancelled only if it says so.
        confirm_cancelled(_STATUSES.get(str(body.get("status"))), self._account.label)
