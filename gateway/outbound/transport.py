"""Sending to what was checked: the transports under every outbound request.

- ``StreamsTransport`` is httpx's transport on our HTTP/1.1 exchange (``h1.py``); its
  ``open`` and ``exchange`` send a request without httpx's client.
- ``PinnedTransport`` connects only to the addresses that were checked for
  that host; there is no second lookup, so DNS rebinding cannot slip through.
  TLS is still verified against the hostname (SNI and certificate). No proxy
  from the environment, no redirects.

The guarded request and client on top of them are in ``guarded.py``. Network failures
are httpx errors, as from any httpx client.
"""

import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import httpcore
import httpx

from gateway.outbound.addresses import (
    IPAddress,
)
from gateway.outbound.h1 import NO_TIMEOUTS, H1Pool, H1Response, Timeouts, origin_of
from gateway.outbound.sockets import AsyncioBackend, PinnedBackend

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


def _streamed(response: H1Response) -> httpx.Response:
    """httpx's answer on ours: its head now, its body as the reader reads it."""
    return httpx.Response(
        status_code=response.status,
        headers=response.headers,
        stream=_ResponseStream(response),
        extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason},
    )


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
        return _streamed(response)

    async def _send(
        self,
        method: str,
        target: httpx.URL,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        timeouts: Timeouts,
    ) -> H1Response:
        fields = dict(_DEFAULT_HEADERS)
        for name, value in (headers or {}).items():
            fields[name.lower()] = value
        raw = [(b"Host", target.netloc)]
        raw += [(name.encode("ascii"), value.encode()) for name, value in fields.items()]
        body = content or b""
        if body or method in _WITH_BODY:
            raw.append((b"Content-Length", b"%d" % len(body)))
        with _as_httpx_errors():
            return await self._pool.request(
                method.encode("ascii"),
                origin_of(target.raw_scheme, target.raw_host, target.port),
                target.raw_path,
                raw,
                body,
                timeouts,
            )

    async def open(
        self,
        method: str,
        target: httpx.URL,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        timeouts: Timeouts,
    ) -> httpx.Response:
        """One request past httpx's client (its URL merging, cookies, hooks: most of a
        request's CPU), the answer's body still to be read: ``aclose`` it."""
        response = await self._send(method, target, content, headers, timeouts)
        return _streamed(response)

    async def exchange(
        self,
        method: str,
        target: httpx.URL,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        max_response_bytes: int,
    ) -> httpx.Response:
        """As ``open``, the answer read, its body cut at ``max_response_bytes``. Time limits
        are the caller's."""
        response = await self._send(method, target, content, headers, NO_TIMEOUTS)
        with _as_httpx_errors():
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
