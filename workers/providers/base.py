"""The one interface every upstream adapter implements.

An adapter speaks one provider's wire protocol and nothing else: it never
touches the database, the ledger or storage. It returns what the upstream said
(``Submitted`` / ``JobState``) or raises from this tree:

    UpstreamError                 base; ``retryable`` says whether to try again
    ├── UpstreamUnavailable       connect error, timeout, 5xx, 429, a 4xx outside the
    │   │                         protocol's error shape (retryable; ``retry_after``
    │   │                         when the upstream gave one; ``rate_limited`` for a
    │   │                         429: the whole account backs off, not only this call)
    │   ├── UpstreamCredentialsRefused  401/403: the channel's key is bad
    │   │                         (``opens_circuit``: its circuit opens at once)
    │   └── UpstreamNotFound      404/410: a wrong path, or a job the upstream lost
    │                             (a poll stops at once: there is no job to wait for)
    ├── UpstreamProtocolError     a body we cannot read, one past its cap, a redirect
    │                             (retryable)
    ├── UpstreamRejected          a 4xx in the protocol's error shape: the request's
    │                             fault (final)
    ├── UpstreamRateLimited       every channel kept answering 429 past the wait cap
    │                             (final; raised by the failover, not by adapters)
    ├── UpstreamBadResult         results that are not images we store
    └── UpstreamJobFailed         the upstream reported the job failed

The last two are final on their channel (``try_elsewhere``): another channel
is tried, this one is not asked again for the task.

Messages are Tollgate's own words: no upstream URL, key or raw body, because
they reach the tenant as the task's error.
"""

from dataclasses import dataclass, field
from typing import Literal, Protocol
from urllib.parse import urlsplit

from pricing.request import ImageRequest

JobStatus = Literal["pending", "processing", "completed", "failed", "cancelled"]


class UpstreamError(Exception):
    retryable = False
    # Final for this channel, but another channel may well succeed (a failed job,
    # a result that is not an image): routing moves on without retrying this one.
    try_elsewhere = False
    # The channel itself is broken (bad credentials): open its circuit now, not after
    # ``circuit_failure_threshold`` tasks have each found out.
    opens_circuit = False
    code = "upstream_error"
    # The ``outcome`` label of tollgate_upstream_requests_total for this error.
    kind = "rejected"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        rate_limited: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.rate_limited = rate_limited
        self.timed_out = timed_out

    @property
    def outcome(self) -> str:
        if self.rate_limited:
            return "rate_limited"
        if self.timed_out:
            return "timeout"
        return self.kind


class UpstreamUnavailable(UpstreamError):
    retryable = True
    code = "upstream_unavailable"
    kind = "unavailable"


class UpstreamCredentialsRefused(UpstreamUnavailable):
    """401 or 403: the upstream refuses the channel's key, whatever the request."""

    opens_circuit = True


class UpstreamNotFound(UpstreamUnavailable):
    """404 or 410: the upstream knows no such path, or no longer knows the job."""


class UpstreamProtocolError(UpstreamError):
    retryable = True
    code = "upstream_bad_response"
    kind = "bad_response"


class UpstreamRejected(UpstreamError):
    code = "upstream_rejected"


class UpstreamRateLimited(UpstreamError):
    """The upstreams kept refusing with 429 for longer than Tollgate waits (final)."""

    code = "upstream_rate_limited"
    kind = "rate_limited"


class UpstreamBadResult(UpstreamError):
    try_elsewhere = True
    code = "upstream_bad_result"
    kind = "bad_response"


class UpstreamCancelled(UpstreamError):
    """The upstream cancelled the job on its own (final)."""

    code = "upstream_cancelled"
    kind = "job_failed"


class UpstreamJobFailed(UpstreamError):
    """The upstream took the job and reported it failed."""

    try_elsewhere = True
    code = "generation_failed"
    kind = "job_failed"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an adapter calls and with what: one channel's account, and its time limits.

    ``submit_timeout`` bounds a submit (for a synchronous upstream, the whole
    generation); ``poll_timeout`` each poll or cancel. Connecting has its own
    limit, set on the shared HTTP client. ``max_body_bytes`` caps every API body
    read; an adapter whose protocol returns images inline raises it for that call
    by ``inline_images_cap`` (``max_image_bytes`` per image, as base64).
    """

    base_url: str
    api_key: str = field(repr=False)
    submit_timeout: float = 30.0
    poll_timeout: float = 10.0
    max_body_bytes: int = 1_048_576
    max_image_bytes: int = 52_428_800

    def inline_images_cap(self, images: int) -> int:
        """The body cap for an answer carrying ``images`` base64 images of at most
        ``max_image_bytes`` each, plus the usual JSON around them."""
        per_image = -(-self.max_image_bytes // 3) * 4  # base64: 4 characters per 3 bytes
        return self.max_body_bytes + images * per_image

    @property
    def host(self) -> str:
        """The host of ``base_url``, lower case (result links there skip the address guard)."""
        return (urlsplit(self.base_url).hostname or "").lower()


@dataclass(frozen=True, slots=True)
class JobState:
    status: JobStatus
    progress: int | None = None
    urls: tuple[str, ...] = ()
    error: str | None = None
    # Result images the upstream sent inline (e.g. OpenAI's b64_json), already decoded.
    images: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Submitted:
    """An async upstream returns a ``job_id``; a synchronous one, the final ``state``."""

    job_id: str | None = None
    state: JobState | None = field(default=None)


class Provider(Protocol):
    """One upstream protocol. Built per channel as ``Adapter(http_client, endpoint)``.

    ``supports_cancel`` says whether ``cancel`` reaches the upstream; a
    synchronous adapter has no job to poll or cancel (``submit`` returns the
    final state, and ``poll``/``cancel`` raise ``UpstreamRejected``).
    """

    name: str
    supports_cancel: bool

    async def submit(self, upstream_model: str, request: ImageRequest) -> Submitted: ...

    async def poll(self, job_id: str) -> JobState: ...

    async def cancel(self, job_id: str) -> None: ...
