"""The one interface every upstream adapter implements.

An adapter speaks one provider's wire protocol and nothing else: it never
touches the database, the ledger or storage. It returns what the upstream said
(``Submitted`` / ``JobState``) or raises from this tree:

    UpstreamError                 base; ``retryable`` says whether to try again
    ├── UpstreamUnavailable       connect error, timeout, 5xx, 429 (retryable;
    │                             ``retry_after`` when the upstream gave one;
    │                             ``rate_limited`` for a 429: the whole account
    │                             backs off, not only this call)
    ├── UpstreamProtocolError     a body we cannot read (retryable)
    ├── UpstreamRejected          a 4xx that is the request's fault (final)
    └── UpstreamBadResult         results that are not images we store (final)

Messages are Tollgate's own words: no upstream URL, key or raw body, because
they reach the tenant as the task's error.
"""

from dataclasses import dataclass, field
from typing import Literal, Protocol

from pricing.request import ImageRequest

JobStatus = Literal["pending", "processing", "completed", "failed", "cancelled"]


class UpstreamError(Exception):
    retryable = False
    code = "upstream_error"

    def __init__(
        self, message: str, *, retry_after: float | None = None, rate_limited: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.rate_limited = rate_limited


class UpstreamUnavailable(UpstreamError):
    retryable = True
    code = "upstream_unavailable"


class UpstreamProtocolError(UpstreamError):
    retryable = True
    code = "upstream_bad_response"


class UpstreamRejected(UpstreamError):
    code = "upstream_rejected"


class UpstreamBadResult(UpstreamError):
    code = "upstream_bad_result"


@dataclass(frozen=True, slots=True)
class JobState:
    status: JobStatus
    progress: int | None = None
    urls: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Submitted:
    """An async upstream returns a ``job_id``; a synchronous one, the final ``state``."""

    job_id: str | None = None
    state: JobState | None = field(default=None)


class Provider(Protocol):
    name: str

    async def submit(self, upstream_model: str, request: ImageRequest) -> Submitted: ...

    async def poll(self, job_id: str) -> JobState: ...

    async def cancel(self, job_id: str) -> None: ...
