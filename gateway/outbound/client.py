"""``OutboundClient``: httpx's client for the workers' upstream calls, its plain requests sent
past httpx's client layers.

An upstream call or an image download is a method, a URL, headers, maybe a body (``content``
or ``json``) and a time limit, redirects not followed. Such a request goes straight to the
transport (``StreamsTransport.open``): httpx's client spends about as much CPU on it (the URL
merged with a base, headers with the client's, the cookie jar, auth and redirect machinery,
its stream wrappers) as all the rest: 264-273 µs a request through it, 142 this way
(docs/performance.md, "Eighth round"). Any other request (query ``params``, ``files``,
``auth``, a redirect to follow, a client with a base URL) takes httpx's own way. The answer
is httpx's ``Response``, its body streamed either way. No cookie is kept on the plain way:
an upstream's cookie would otherwise go with our requests to every channel on its host.
"""

import contextlib
import json as jsonlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from gateway.outbound.h1 import Timeouts
from gateway.outbound.transport import StreamsTransport


class OutboundClient(httpx.AsyncClient):
    """httpx's client on a ``StreamsTransport``; ``stream`` takes the plain way when it can."""

    def __init__(self, transport: StreamsTransport, *, timeout: httpx.Timeout) -> None:
        super().__init__(
            transport=transport, timeout=timeout, trust_env=False, follow_redirects=False
        )
        self._plain = transport

    @contextlib.asynccontextmanager
    async def stream(  # type: ignore[override]
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
        timeout: Any = httpx.USE_CLIENT_DEFAULT,  # noqa: ASYNC109 - httpx's interface
        **others: Any,
    ) -> AsyncIterator[httpx.Response]:
        target = httpx.URL(url) if isinstance(url, str) else url
        plain = (
            not others
            and follow_redirects is not True
            and target.scheme in ("http", "https")
            and isinstance(content, bytes | None)
            and isinstance(headers, Mapping | None)
        )
        if not plain:
            async with super().stream(
                method,
                url,
                content=content,
                json=json,
                headers=headers,
                follow_redirects=follow_redirects,
                timeout=timeout,
                **others,
            ) as response:
                yield response
            return
        fields = dict(headers or {})
        if json is not None:
            # As httpx encodes it.
            content = jsonlib.dumps(
                json, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
            fields.setdefault("content-type", "application/json")
        limits = self.timeout if timeout is httpx.USE_CLIENT_DEFAULT else httpx.Timeout(timeout)
        timeouts = Timeouts(
            connect=limits.connect, read=limits.read, write=limits.write, pool=limits.pool
        )
        response = await self._plain.open(method, target, content, fields, timeouts)
        try:
            yield response
        finally:
            await response.aclose()
