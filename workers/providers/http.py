"""Shared HTTP plumbing for adapters: one place maps transport failures to the error tree."""

from typing import Any

import httpx

from workers.providers.base import (
    Endpoint,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamUnavailable,
)

# Answers that blame the request itself: another channel would refuse it too.
REQUEST_FAULTS = frozenset({400, 409, 413, 415, 422})


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def call_json(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    api_key: str,
    provider: str,
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
        response = await client.request(
            method, url, json=json, headers={header[0]: header[1]}, **extra
        )
    except httpx.TimeoutException:
        raise UpstreamUnavailable(f"{provider} did not answer in time", timed_out=True) from None
    except httpx.TransportError:
        raise UpstreamUnavailable(f"{provider} could not be reached") from None
    status = response.status_code
    if status == 429:
        raise UpstreamUnavailable(
            f"{provider} is rate limiting requests",
            retry_after=_retry_after(response),
            rate_limited=True,
        )
    if status >= 500:
        raise UpstreamUnavailable(f"{provider} had an internal error (HTTP {status})")
    if status in (401, 403):
        # Our credentials, not the tenant's request: retryable on another account.
        raise UpstreamUnavailable(f"{provider} refused Tollgate's credentials (HTTP {status})")
    if status in REQUEST_FAULTS:
        raise UpstreamRejected(f"{provider} rejected the request as invalid (HTTP {status})")
    if status >= 400:
        # 404, 405, 410…: a channel pointing at the wrong place (or a job the upstream
        # lost), not the tenant's request; another channel may well serve it.
        raise UpstreamUnavailable(f"{provider} could not serve the request (HTTP {status})")
    try:
        body = response.json()
    except ValueError:
        raise UpstreamProtocolError(f"{provider} sent a response that is not JSON") from None
    if not isinstance(body, dict):
        raise UpstreamProtocolError(f"{provider} sent an unexpected response")
    return body


def _connect_limit(client: httpx.AsyncClient, timeout: float) -> float | None:
    """The client's connect limit, never longer than the call's whole limit."""
    connect = client.timeout.connect
    return timeout if connect is None else min(connect, timeout)


class AccountClient:
    """One channel's account: its base URL, key and time limits, and the words errors use.

    ``submit`` calls get the endpoint's submit limit, everything else its poll
    limit. ``auth_header`` builds the header carrying the key (default Bearer).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        endpoint: Endpoint,
        label: str,
        *,
        auth_header: tuple[str, str] | None = None,
    ) -> None:
        self._client = client
        self._endpoint = endpoint
        self._base = endpoint.base_url.rstrip("/")
        self._auth = auth_header
        self.label = label

    async def call(
        self,
        method: str,
        path: str,
        json: dict[str, Any] | None = None,
        *,
        submit: bool = False,
    ) -> dict[str, Any]:
        """Call ``path`` (or an absolute URL on the upstream, e.g. a polling URL)."""
        url = path if path.startswith(("http://", "https://")) else f"{self._base}{path}"
        endpoint = self._endpoint
        return await call_json(
            self._client,
            method,
            url,
            api_key=endpoint.api_key,
            provider=self.label,
            json=json,
            timeout=endpoint.submit_timeout if submit else endpoint.poll_timeout,
            auth_header=self._auth,
        )
