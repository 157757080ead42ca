"""Shared HTTP plumbing for adapters: one place maps upstream answers to the error tree.

Rules every adapter's calls follow here:

- **Bodies are read with a cap.** A body is streamed and refused once it passes
  ``Endpoint.max_body_bytes`` (or the larger cap a call asks for, such as OpenAI's inline
  images): ``UpstreamProtocolError`` (``upstream_bad_response``), never read whole.
- **A 4xx is the request's fault only in the protocol's own words.** 400, 409, 413, 415 and
  422 fail the task (``UpstreamRejected``) only when the body is a JSON object of the
  protocol's error shape (``ErrorShape``); an HTML page from a load balancer, or any other
  body, is the channel's fault and fails over (``UpstreamUnavailable``).
- **401 and 403 are our credentials**, not the tenant's request: ``UpstreamCredentialsRefused``
  fails over and opens the channel's circuit at once.
- **Redirects are never followed** (the key would go with them): a 3xx is
  ``UpstreamProtocolError`` saying so.
- **A response in doubt is closed unread.** Only bodies read to their end return their
  connection to the pool; an answer whose body we do not read (a redirect, 401/403, 429,
  5xx, an error that is not JSON, a body past its cap) is closed first, so httpx drops its
  connection rather than reusing one whose state we cannot vouch for.
"""

from collections.abc import Callable
from json import loads as json_loads
from typing import Any

import httpx

from workers.providers.base import (
    Endpoint,
    UpstreamCredentialsRefused,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamUnavailable,
)

# Answers that may blame the request itself: another channel would refuse it too.
REQUEST_FAULTS = frozenset({400, 409, 413, 415, 422})
# An error body in the protocol's shape is small; one larger is not the protocol's.
ERROR_BODY_LIMIT = 65_536

ErrorShape = Callable[[object], bool]
"""Whether a decoded 4xx body is the protocol's own error shape."""


def message_error(body: object) -> bool:
    """``{"error": {"message": "..."}}``: the unified API's and OpenAI's error shape."""
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _is_json(response: httpx.Response) -> bool:
    kind: str = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


async def read_capped(response: httpx.Response, max_bytes: int, provider: str) -> bytes:
    """The body, streamed; ``UpstreamProtocolError`` once it passes ``max_bytes``."""
    too_large = UpstreamProtocolError(f"{provider} sent a body larger than {max_bytes} bytes")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(data: bytes) -> object:
    """The JSON value of ``data``, or None when it is not JSON."""
    try:
        return json_loads(data)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return None


async def _refusal(
    response: httpx.Response, provider: str, error_shape: ErrorShape
) -> UpstreamRejected | UpstreamUnavailable:
    """The error for a 4xx other than 401, 403 and 429."""
    status = response.status_code
    outside = UpstreamUnavailable(f"{provider} answered HTTP {status} outside its protocol")
    if status in (404, 410):
        # A channel pointing at the wrong place, or a job the upstream lost: not the
        # tenant's request; another channel may well serve it.
        return UpstreamNotFound(f"{provider} could not serve the request (HTTP {status})")
    if status not in REQUEST_FAULTS:
        # 405 and the like: the channel, not the request.
        return UpstreamUnavailable(f"{provider} could not serve the request (HTTP {status})")
    if not _is_json(response):
        return outside
    try:
        body = decode_json(await read_capped(response, ERROR_BODY_LIMIT, provider))
    except UpstreamProtocolError:
        return outside
    if not error_shape(body):
        return outside
    return UpstreamRejected(f"{provider} rejected the request as invalid (HTTP {status})")


def status_error(
    response: httpx.Response, provider: str
) -> UpstreamProtocolError | UpstreamUnavailable | None:
    """The error for an answer whose body is not read (3xx, 401, 403, 429, 5xx), or None."""
    status = response.status_code
    if 300 <= status < 400:
        return UpstreamProtocolError(
            f"{provider} answered a redirect, not followed (HTTP {status})"
        )
    if status == 429:
        return UpstreamUnavailable(
            f"{provider} is rate limiting requests",
            retry_after=_retry_after(response),
            rate_limited=True,
        )
    if status >= 500:
        return UpstreamUnavailable(f"{provider} had an internal error (HTTP {status})")
    if status in (401, 403):
        return UpstreamCredentialsRefused(
            f"{provider} refused Tollgate's credentials (HTTP {status})"
        )
    return None


async def call_json(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    api_key: str,
    provider: str,
    max_bytes: int,
    error_shape: ErrorShape,
    json: dict[str, Any] | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 - httpx's own per-request limit
    auth_header: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """One upstream call returning its JSON object, or an Upstream* error in our words.

    The key goes in ``Authorization: Bearer`` unless ``auth_header`` names
    another header and value (BFL's ``x-key``, say).
    """
    header = auth_header or ("Authorization", f"Bearer {api_key}")
    extra: dict[str, Any] = {}
    if timeout is not None:
        extra["timeout"] = httpx.Timeout(timeout, connect=_connect_limit(client, timeout))
    try:
        # Raising inside the block closes the response unread, and with it its connection.
        async with client.stream(
            method,
            url,
            json=json,
            headers={header[0]: header[1]},
            follow_redirects=False,
            **extra,
        ) as response:
            error = status_error(response, provider)
            if error is not None:
                raise error
            if response.status_code >= 400:
                raise await _refusal(response, provider, error_shape)
            data = await read_capped(response, max_bytes, provider)
    except httpx.TimeoutException:
        raise UpstreamUnavailable(f"{provider} did not answer in time", timed_out=True) from None
    except httpx.TransportError:
        raise UpstreamUnavailable(f"{provider} could not be reached") from None
    body = decode_json(data)
    if body is None and data.strip() != b"null":
        raise UpstreamProtocolError(f"{provider} sent a response that is not JSON")
    if not isinstance(body, dict):
        raise UpstreamProtocolError(f"{provider} sent an unexpected response")
    return body


def confirm_cancelled(status: str | None, provider: str) -> None:
    """A cancel succeeded only when the upstream shows the job cancelled.

    A job already at its end cannot be cancelled (``UpstreamRejected``); one still
    running after a 2xx was not cancelled, whatever the status code said
    (``UpstreamUnavailable``: asking again later may work).
    """
    if status == "cancelled":
        return
    if status in ("completed", "failed"):
        raise UpstreamRejected(f"{provider} cannot cancel the job: it already ended")
    raise UpstreamUnavailable(f"{provider} did not confirm the cancel: the job is still running")


def _connect_limit(client: httpx.AsyncClient, timeout: float) -> float | None:
    """The client's connect limit, never longer than the call's whole limit."""
    connect = client.timeout.connect
    return timeout if connect is None else min(connect, timeout)


class AccountClient:
    """One channel's account: its base URL, key, limits, error shape and the words errors use.

    ``submit`` calls get the endpoint's submit limit, everything else its poll
    limit. ``auth_header`` builds the header carrying the key (default Bearer).
    ``error_shape`` recognises the protocol's own 4xx bodies.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        endpoint: Endpoint,
        label: str,
        *,
        error_shape: ErrorShape,
        auth_header: tuple[str, str] | None = None,
    ) -> None:
        self._client = client
        self._endpoint = endpoint
        self._base = endpoint.base_url.rstrip("/")
        self._auth = auth_header
        self._error_shape = error_shape
        self.label = label

    async def call(
        self,
        method: str,
        path: str,
        json: dict[str, Any] | None = None,
        *,
        submit: bool = False,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Call ``path`` (or an absolute URL on the upstream, e.g. a polling URL).

        ``max_bytes`` raises the body cap for this call (never lowers it below the
        endpoint's).
        """
        url = path if path.startswith(("http://", "https://")) else f"{self._base}{path}"
        endpoint = self._endpoint
        return await call_json(
            self._client,
            method,
            url,
            api_key=endpoint.api_key,
            provider=self.label,
            max_bytes=max(endpoint.max_body_bytes, max_bytes or 0),
            error_shape=self._error_shape,
            json=json,
            timeout=endpoint.submit_timeout if submit else endpoint.poll_timeout,
            auth_header=self._auth,
        )
