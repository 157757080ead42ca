"""The guarded request: every rule of the package on one request, or on a client's.

- ``guarded_request`` (and ``guarded_post``) apply every rule of the package
  to one request: the URL's form, one lookup, the pinned connection
  (``transport.PinnedTransport``), one time budget, a response body cut at
  ``max_response_bytes``.
- ``GuardedClient`` does the same with connections kept alive between requests.

Refusals raise ``ForbiddenAddress``; network failures are httpx errors, as
from any httpx client.
"""

import asyncio
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpcore
import httpx

from gateway.outbound.addresses import (
    CheckedAnswers,
    ForbiddenAddress,
    IPAddress,
    Resolver,
    host_key,
)
from gateway.outbound.transport import MAX_RESPONSE_BYTES, PinnedTransport
from gateway.outbound.urls import check_url


async def guarded_post(
    url: str,
    *,
    content: bytes,
    headers: Mapping[str, str],
    timeout: float,  # noqa: ASYNC109 - one budget for lookup and exchange, applied below
    resolver: Resolver | None = None,
    allowed_hosts: frozenset[str] = frozenset(),
    ca_bundle: Path | None = None,
    network_backend: httpcore.AsyncNetworkBackend | None = None,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
) -> httpx.Response:
    """POST ``content`` to ``url`` under every rule of this module (``guarded_request``)."""
    return await guarded_request(
        "POST",
        url,
        content=content,
        headers=headers,
        timeout=timeout,
        resolver=resolver,
        allowed_hosts=allowed_hosts,
        ca_bundle=ca_bundle,
        network_backend=network_backend,
        max_response_bytes=max_response_bytes,
    )


async def guarded_request(
    method: str,
    url: str,
    *,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float,  # noqa: ASYNC109 - one budget for lookup and exchange, applied below
    resolver: Resolver | None = None,
    allowed_hosts: frozenset[str] = frozenset(),
    ca_bundle: Path | None = None,
    network_backend: httpcore.AsyncNetworkBackend | None = None,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
) -> httpx.Response:
    """Send one request to ``url`` under every rule of this module.

    Checks the form, resolves once, connects to the first checked address that
    accepts (the next on a connection failure), verifies TLS against the
    hostname, follows no redirect. The whole exchange, lookup included, has
    ``timeout`` seconds. The response comes back read, its body cut at
    ``max_response_bytes``. Raises ``ForbiddenAddress`` or an ``httpx.HTTPError``.
    The connection is closed afterwards; ``GuardedClient`` keeps it for the next.
    """
    target, connect_host, port = _checked_target(url, allowed_hosts)
    try:
        async with asyncio.timeout(timeout):
            answers = CheckedAnswers(0, resolver=resolver, allowed_hosts=allowed_hosts)
            addresses = await _resolve(connect_host, port, answers)
            transport = PinnedTransport(
                {connect_host: addresses}, ca_bundle=ca_bundle, network_backend=network_backend
            )
            try:
                return await transport.exchange(
                    method, target, content, headers, max_response_bytes
                )
            finally:
                await transport.aclose()
    except TimeoutError:
        raise httpx.TimeoutException(f"no answer within {timeout} s") from None


class GuardedClient:
    """``guarded_request`` with connections kept alive between requests to a host.

    Every request is checked exactly as by ``guarded_request``: the URL's form,
    one lookup, every address public. It then goes through the transport pinned
    to exactly the addresses that lookup gave (for that host and port): a kept
    connection is reused only while the host still resolves to those checked
    addresses; a host whose answer changed gets a new transport, pinned to the
    new ones. Up to ``max_hosts`` transports are kept (the least recently used
    one is closed past that), each with up to ``connections_per_host`` connections
    idle at most ``keepalive_seconds``. ``aclose`` closes them all.

    ``answer_seconds`` (default 0: a lookup per request) lets requests to a host
    within that many seconds of its lookup use the same checked answer: only
    answers that passed the check are kept, so nothing refused is ever reused,
    and a connection failure forgets the host's answer. A busy receiver then
    costs one lookup per interval, not one per request.
    """

    def __init__(
        self,
        *,
        resolver: Resolver | None = None,
        allowed_hosts: frozenset[str] = frozenset(),
        ca_bundle: Path | None = None,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
        max_hosts: int = 256,
        connections_per_host: int = 32,
        keepalive_seconds: float = 30.0,
        answer_seconds: float = 0.0,
    ) -> None:
        self._answers = CheckedAnswers(
            answer_seconds, resolver=resolver, allowed_hosts=allowed_hosts, max_hosts=max_hosts
        )
        self._allowed_hosts = allowed_hosts
        self._ca_bundle = ca_bundle
        self._network_backend = network_backend
        self._max_hosts = max_hosts
        self._per_host = connections_per_host
        self._keepalive = keepalive_seconds
        # Per host and answer: its transport (requests past its connections wait their turn).
        self._transports: OrderedDict[tuple[str, int, tuple[IPAddress, ...]], PinnedTransport]
        self._transports = OrderedDict()

    def __len__(self) -> int:
        return len(self._transports)

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float,  # noqa: ASYNC109 - one budget for lookup and exchange, applied below
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> httpx.Response:
        """As ``guarded_request``, over a kept connection when there is one."""
        target, connect_host, port = _checked_target(url, self._allowed_hosts)
        try:
            async with asyncio.timeout(timeout):
                addresses = await _resolve(connect_host, port, self._answers)
                transport = await self._transport_for(connect_host, port, addresses)
                try:
                    return await transport.exchange(
                        method, target, content, headers, max_response_bytes
                    )
                except (httpx.ConnectError, httpx.ConnectTimeout):
                    # The host may have moved: its next request looks it up again.
                    self._answers.forget(connect_host, port)
                    raise
        except TimeoutError:
            raise httpx.TimeoutException(f"no answer within {timeout} s") from None

    async def post(
        self,
        url: str,
        *,
        content: bytes,
        headers: Mapping[str, str],
        timeout: float,  # noqa: ASYNC109 - passed on
    ) -> httpx.Response:
        return await self.request("POST", url, content=content, headers=headers, timeout=timeout)

    async def _transport_for(
        self, host: str, port: int, addresses: Sequence[IPAddress]
    ) -> PinnedTransport:
        key = (host_key(host), port, tuple(addresses))
        kept = self._transports.get(key)
        if kept is not None:
            self._transports.move_to_end(key)
            return kept
        # The host's checked addresses changed (or it is new): its old connections go.
        stale = [k for k in self._transports if k[:2] == key[:2]]
        while len(self._transports) - len(stale) >= self._max_hosts:
            stale.append(next(k for k in self._transports if k not in stale))
        for old in stale:
            await self._transports.pop(old).aclose()
        transport = PinnedTransport(
            {host: addresses},
            ca_bundle=self._ca_bundle,
            network_backend=self._network_backend,
            max_connections=self._per_host,
            keepalive_expiry=self._keepalive,
        )
        self._transports[key] = transport
        return transport

    async def aclose(self) -> None:
        transports, self._transports = list(self._transports.values()), OrderedDict()
        self._answers.clear()
        for transport in transports:
            await transport.aclose()


def _checked_target(url: str, allowed_hosts: frozenset[str]) -> tuple[httpx.URL, str, int]:
    """The URL as httpx will send it, after the form's checks: (URL, host, port)."""
    host = check_url(url, allowed_hosts=allowed_hosts)
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        raise ForbiddenAddress("is not a valid URL") from None
    # The host httpx will connect to must be the one checked: two URL parsers
    # that read a URL differently are a classic way around a guard.
    connect_host = target.raw_host.decode("ascii")
    if host_key(connect_host) != host_key(host):
        raise ForbiddenAddress("is not a valid URL")
    return target, connect_host, target.port or 443


async def _resolve(host: str, port: int, answers: CheckedAnswers) -> list[IPAddress]:
    try:
        return await answers.resolve(host, port)
    except OSError as exc:
        raise httpx.ConnectError(f"could not resolve {host}: {exc}") from exc
