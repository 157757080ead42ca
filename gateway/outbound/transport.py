"""Sending to what was checked: the pinned transport and the guarded request.

- ``PinnedTransport`` connects only to the addresses that were checked for
  that host; there is no second lookup, so DNS rebinding cannot slip through.
  TLS is still verified against the hostname (SNI and certificate). No proxy
  from the environment, no redirects.
- ``guarded_request`` (and ``guarded_post``) apply every rule of the package
  to one request: the URL's form, one lookup, the pinned connection, one time
  budget, a response body cut at ``max_response_bytes``.

Refusals raise ``ForbiddenAddress``; network failures are httpx errors, as
from any httpx client.
"""

import asyncio
import contextlib
import functools
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
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
from gateway.outbound.h1 import H1Pool, H1Response, Timeouts, origin_of
from gateway.outbound.sockets import AsyncioBackend, PinnedBackend
from gateway.outbound.urls import check_url

# A receiver's answer is only looked at for its status; the body is cut here.
MAX_RESPONSE_BYTES = 65_536
# Headers that describe a body's framing: set from the body as sent, dropped from an answer
# handed back read (decoded, maybe cut).
_BODY_FRAMING_RAW = frozenset({b"content-encoding", b"content-length", b"transfer-encoding"})
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# ``exchange``'s own: an answer compressed could expand without bound before the cut.
_DEFAULT_HEADERS = {"accept": "*/*", "accept-encoding": "identity", "user-agent": "Tollgate"}

# httpcore's errors as httpx raises them; the first match in an error's MRO wins.
_HTTPX_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.ProxyError: httpx.ProxyError,
}


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except tuple(_HTTPX_ERRORS) as exc:
        ours = next(_HTTPX_ERRORS[kind] for kind in type(exc).__mro__ if kind in _HTTPX_ERRORS)
        raise ours(str(exc)) from exc


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: H1Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for chunk in self._response.chunks():
                yield chunk

    async def aclose(self) -> None:
        with _as_httpx_errors():
            await self._response.aclose()


@functools.lru_cache(maxsize=8)
def _ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    # Built once per bundle: loading the certifi store costs milliseconds per delivery.
    context = httpx.create_ssl_context(trust_env=False)
    if ca_bundle is not None:
        context.load_verify_locations(cafile=ca_bundle)
    return context


class StreamsTransport(httpx.AsyncBaseTransport):
    """httpx's transport on our HTTP/1.1 exchange (``h1.H1Pool``) over asyncio streams
    (``sockets.AsyncioBackend``: TLS by the running loop, a cheap idle check), where httpcore's
    pool and h11 cost a worker's upstream calls and image downloads, and each delivery, most of
    their CPU. HTTP/1.1, no proxy whatever the environment says, no retries; the system CA store
    (certifi), plus ``ca_bundle``. ``exchange`` is one request without httpx's client."""

    def __init__(
        self,
        *,
        ca_bundle: Path | None = None,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
        max_connections: int = 10,
        max_keepalive_connections: int | None = None,
        keepalive_expiry: float | None = None,
    ) -> None:
        self._pool = H1Pool(
            ssl_context=_ssl_context(ca_bundle),
            network_backend=network_backend or AsyncioBackend(),
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=keepalive_expiry,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        url = request.url
        # The bodies we send are in memory already: sent with a length, in the head's write.
        body = b"".join([part async for part in request.stream])
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _BODY_FRAMING_RAW]
        if body or request.method in _WITH_BODY:
            headers.append((b"Content-Length", b"%d" % len(body)))
        timeouts = request.extensions.get("timeout") or {}
        with _as_httpx_errors():
            response = await self._pool.request(
                request.method.encode("ascii"),
                origin_of(url.raw_scheme, url.raw_host, url.port),
                url.raw_path,
                headers,
                body,
                Timeouts(
                    connect=timeouts.get("connect"),
                    read=timeouts.get("read"),
                    write=timeouts.get("write"),
                    pool=timeouts.get("pool"),
                ),
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason},
        )

    async def exchange(
        self,
        method: str,
        target: httpx.URL,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        max_response_bytes: int,
    ) -> httpx.Response:
        """One request past httpx's client (its URL merging, cookies, hooks: most of a
        delivery's CPU); the answer read, its body cut at ``max_response_bytes``. Time
        limits are the caller's."""
        fields = dict(_DEFAULT_HEADERS)
        for name, value in (headers or {}).items():
            fields[name.lower()] = value
        raw = [(b"Host", target.netloc)]
        raw += [(name.encode("ascii"), value.encode()) for name, value in fields.items()]
        body = content or b""
        if body or method in _WITH_BODY:
            raw.append((b"Content-Length", b"%d" % len(body)))
        with _as_httpx_errors():
            response = await self._pool.request(
                method.encode("ascii"),
                origin_of(target.raw_scheme, target.raw_host, target.port),
                target.raw_path,
                raw,
                body,
            )
            try:
                data = await response.read(max_response_bytes)
            finally:
                await response.aclose()
        return httpx.Response(
            status_code=response.status,
            headers=[(k, v) for k, v in response.headers if k.lower() not in _BODY_FRAMING_RAW],
            content=data,
            request=httpx.Request(method, target),
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class PinnedTransport(StreamsTransport):
    """Sends each request to the addresses checked for its host, and nowhere else.

    ``pins`` maps a host to its checked addresses (``resolve_public``); a request
    to any other host raises ``ForbiddenAddress`` before a socket is opened. The
    TCP connection goes to a pinned address while TLS sends the URL's hostname
    for SNI and verifies the certificate against it, as for any request. The
    system CA store (certifi) is trusted, plus ``ca_bundle`` when given.
    ``network_backend`` opens the sockets (default: asyncio streams, ``sockets.py``);
    tests pass one that records connections instead of making them. There is
    no proxy here whatever the environment says; redirects are the client's,
    and ``guarded_post`` follows none.
    """

    def __init__(
        self,
        pins: Mapping[str, Sequence[IPAddress]],
        *,
        ca_bundle: Path | None = None,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
        max_connections: int = 10,
        keepalive_expiry: float | None = None,
    ) -> None:
        super().__init__(
            ca_bundle=ca_bundle,
            network_backend=PinnedBackend(pins, network_backend or AsyncioBackend()),
            max_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
        )


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
