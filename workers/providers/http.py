"""Shared HTTP plumbing for adapters: one place maps transport failures to the error tree."""

from typing import Any

import httpx

from gateway.settings import UpstreamAccount
from workers.providers.base import (
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamUnavailable,
)


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
) -> dict[str, Any]:
    """One upstream call returning its JSON object, or an Upstream* error in our words."""
    try:
        response = await client.request(
            method, url, json=json, headers={"Authorization": f"Bearer {api_key}"}
        )
    except httpx.TimeoutException:
        raise UpstreamUnavailable(f"{provider} did not answer in time") from None
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
    if status >= 400:
        raise UpstreamRejected(f"{provider} rejected the request (HTTP {status})")
    try:
        body = response.json()
    except ValueError:
        raise UpstreamProtocolError(f"{provider} sent a response that is not JSON") from None
    if not isinstance(body, dict):
        raise UpstreamProtocolError(f"{provider} sent an unexpected response")
    return body


class AccountClient:
    """One upstream account: its base URL and key, and the words errors use for it."""

    def __init__(self, client: httpx.AsyncClient, account: UpstreamAccount, label: str) -> None:
        self._client = client
        self._base = str(account.base_url).rstrip("/")
        self._key = account.api_key
        self.label = label

    async def call(
        self, method: str, path: str, json: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await call_json(
            self._client,
            method,
            f"{self._base}{path}",
            api_key=self._key,
            provider=self.label,
            json=json,
        )
