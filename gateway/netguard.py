"""The guard between Tollgate and the URLs tenants name (callbacks; later, result images).

A tenant chooses where its callbacks go, so every callback is a request Tollgate
makes on a stranger's behalf, from inside our network. The rules:

- Form (``check_url``, at submit and again at delivery): HTTPS, at most 2048
  characters, a well-formed host, no user or password. A host that is an IP
  address in any spelling the C resolver accepts (``2130706433``, ``0x7f.1``,
  ``017700000001``, ``127.1``) is refused at once if it is internal; a public one
  must be written the usual way (``a.b.c.d``), so no two parsers can read it apart.
- Addresses (``resolve_public``, at delivery): the host is resolved once and
  refused if *any* address is not global unicast. Refused: loopback, private
  (10/8, 172.16/12, 192.168/16), link-local (169.254/16, cloud metadata among
  them), shared (100.64/10), 0.0.0.0/8, multicast, broadcast, 240/4, the
  documentation, benchmarking and protocol ranges; in IPv6 ``::``, ``::1``,
  ``fc00::/7``, ``fe80::/10``, ``fec0::/10``, multicast, the deprecated
  IPv4-compatible ``::/96`` and everything outside ``2000::/3``. An IPv6 address
  that embeds an IPv4 one (mapped ``::ffff:0:0/96``, NAT64 ``64:ff9b::/96``, 6to4
  ``2002::/16``, Teredo ``2001::/32``: server and client) is judged by what it
  embeds, because that is where the packets end up. ``ipaddress.is_global`` is
  not used: in Python 3.11 it neither unwraps these forms nor refuses multicast.
- Connection (``PinnedTransport``): only to the addresses that were checked for
  that host; there is no second lookup, so DNS rebinding cannot slip through.
  TLS is still verified against the hostname (SNI and certificate). No proxy
  from the environment, no redirects.
- ``allowed_hosts`` exempts chosen hosts from the internal-address refusal (the
  form rules still apply). It exists for tests with local receivers only.

Every refusal raises ``ForbiddenAddress``: retrying cannot help. Its message
names the host and the kind of address, never the addresses a name resolved to.
Network failures are httpx errors, as from any httpx client.
"""

import asyncio
import contextlib
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Protocol, TypeAlias
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress: TypeAlias = IPv4Address | IPv6Address

MAX_URL_LENGTH = 2048
# A receiver's answer is only looked at for its status; the body is cut here.
MAX_RESPONSE_BYTES = 65_536


class ForbiddenAddress(Exception):
    """The guard will not send to this URL: its form, or an address its host has.

    ``reason`` completes a sentence that starts with the field's name
    ("callback_url: must be an https:// URL").
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- Literal IP addresses --------------------------------------------------

# One part of an IPv4 number as inet_aton(3) reads it: hex, octal (a leading 0) or decimal.
_IPV4_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_LOW32 = 0xFFFF_FFFF


def _inet_aton(text: str) -> int | None:
    """The number inet_aton(3) reads from ``text``, or None where it reads none.

    1 to 4 parts; every part but the last is one byte, the last fills the bytes
    left (``127.1`` is 127.0.0.1). Written out rather than left to the platform,
    so a host means the same here on every machine.
    """
    parts = text.split(".")
    if len(parts) > 4:
        return None
    values: list[int] = []
    for part in parts:
        if not _IPV4_PART.fullmatch(part):
            return None
        if part[:2] in ("0x", "0X"):
            values.append(int(part[2:], 16))
        elif part.startswith("0"):
            values.append(int(part, 8))
        elif len(part) > 10:  # over 32 bits already; int() refuses very long decimals
            return None
        else:
            values.append(int(part))
    *leading, last = values
    if any(value > 0xFF for value in leading) or last >> (8 * (4 - len(leading))):
        return None
    number = last
    for index, value in enumerate(leading):
        number |= value << (8 * (3 - index))
    return number


def _parse_ipv6(text: str) -> IPv6Address:
    # A zone id names an interface of this machine: never a place for a callback.
    if "%" in text:
        raise ValueError("an IPv6 zone id is not allowed")
    return IPv6Address(text)


def parse_literal_ip(host: str) -> IPAddress | None:
    """The IP address ``host`` is, in any spelling a resolver accepts; None for a name.

    Raises ``ValueError`` for a host that can only be meant as IPv6 (brackets, a
    colon) but is not a valid IPv6 address, or carries a zone id. One trailing
    dot is allowed, as browsers read ``127.0.0.1.`` as an address too.
    """
    if host.startswith("[") and host.endswith("]"):
        return _parse_ipv6(host[1:-1])
    if ":" in host:
        return _parse_ipv6(host)
    number = _inet_aton(host.removesuffix("."))
    return None if number is None else IPv4Address(number)


# --- Which addresses are public --------------------------------------------


# First match names the kind, so the broadcast address comes before 240/4.
_IPV4_FORBIDDEN = tuple(
    (IPv4Network(network), what)
    for network, what in [
        ("0.0.0.0/8", "an unspecified ('this network') address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local (cloud metadata) address"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "a reserved (IETF protocol) address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a reserved (6to4 relay) address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
    ]
)

# Checked after the embedded forms below, which are judged by the IPv4 inside.
_IPV6_FORBIDDEN = tuple(
    (IPv6Network(network), what)
    for network, what in [
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("::/96", "a deprecated IPv4-compatible address"),
        ("64:ff9b:1::/48", "a private (local NAT64) address"),
        ("100::/64", "a reserved (discard) address"),
        ("2001::/23", "a reserved (IETF protocol) address"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("fc00::/7", "a private (unique local) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    ]
)
_IPV6_GLOBAL_UNICAST = IPv6Network("2000::/3")

_MAPPED = IPv6Network("::ffff:0:0/96")
_NAT64 = IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = IPv6Network("2002::/16")
_TEREDO = IPv6Network("2001::/32")


def _embedded_ipv4(ip: IPv6Address) -> tuple[str, tuple[IPv4Address, ...]] | None:
    """The IPv4 addresses ``ip`` carries and the name of the form, if it is one."""
    bits = int(ip)
    if ip in _MAPPED:
        return "IPv4-mapped", (IPv4Address(bits & _LOW32),)
    if ip in _NAT64:
        return "NAT64", (IPv4Address(bits & _LOW32),)
    if ip in _SIX_TO_FOUR:  # 2002:AABB:CCDD::/48, the address in bits 16..47
        return "6to4", (IPv4Address((bits >> 80) & _LOW32),)
    if ip in _TEREDO:  # server in bits 32..63, client inverted in the last 32
        return "Teredo", (IPv4Address((bits >> 64) & _LOW32), IPv4Address(~bits & _LOW32))
    return None


def _forbidden_kind(ip: IPAddress) -> str | None:
    """What kind of non-public address ``ip`` is ("a loopback address"); None if public."""
    if isinstance(ip, IPv4Address):
        return next((what for network, what in _IPV4_FORBIDDEN if ip in network), None)
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        form, inner = embedded
        for address in inner:
            what = _forbidden_kind(address)
            if what is not None:
                return f"{what} in {form} form"
        return None
    for network, what in _IPV6_FORBIDDEN:
        if ip in network:
            return what
    return None if ip in _IPV6_GLOBAL_UNICAST else "a reserved address"


def is_public(ip: IPAddress) -> bool:
    """Whether ``ip`` is global unicast, judging embedded IPv4 addresses by themselves."""
    return _forbidden_kind(ip) is None


# --- The form of a URL -----------------------------------------------------

_HOSTNAME = re.compile(r"([a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}\.?")
_MAX_HOSTNAME_LENGTH = 253
# A last label like this can only be meant as an IPv4 address (the WHATWG URL rule).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_BAD_HOST = (
    "must name a valid host: letters, digits, hyphens and dots "
    "(xn-- for international names), or an IP address"
)


def _host_key(host: str) -> str:
    """``host`` as a connection sees it: lower case, no brackets, no root dot, IPs canonical."""
    host = host.lower().removeprefix("[").removesuffix("]").removesuffix(".")
    try:
        literal = parse_literal_ip(host)
    except ValueError:
        return host
    return host if literal is None else str(literal)


def _refuse_internal(host: str, kind: str, *, resolved: bool) -> ForbiddenAddress:
    verb = "resolves to" if resolved else "is"
    return ForbiddenAddress(f"must not point at an internal address: {host} {verb} {kind}")


def check_url(url: str, *, allowed_hosts: frozenset[str] = frozenset()) -> str:
    """The URL's host (lower case, no brackets) if its form passes and no internal IP is in it.

    Raises ``ForbiddenAddress`` otherwise. A hostname is not looked up here:
    ``resolve_public`` does that at delivery.
    """
    if len(url) > MAX_URL_LENGTH:
        raise ForbiddenAddress(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError:
        raise ForbiddenAddress("is not a valid URL") from None
    if parts.scheme != "https":
        raise ForbiddenAddress("must be an https:// URL")
    if not host:
        raise ForbiddenAddress("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ForbiddenAddress("must not contain a user name or password")
    try:
        literal = parse_literal_ip(host)
    except ValueError:
        raise ForbiddenAddress(_BAD_HOST) from None
    if literal is None:
        last_label = host.removesuffix(".").rpartition(".")[2]
        if (
            len(host.removesuffix(".")) > _MAX_HOSTNAME_LENGTH
            or not _HOSTNAME.fullmatch(host)
            or _NUMERIC_LABEL.fullmatch(last_label)
        ):
            raise ForbiddenAddress(_BAD_HOST)
        return host
    kind = _forbidden_kind(literal)
    if kind is not None and _host_key(host) not in {_host_key(h) for h in allowed_hosts}:
        raise _refuse_internal(host, kind, resolved=False)
    if isinstance(literal, IPv4Address) and str(literal) != host:
        raise ForbiddenAddress("must write an IPv4 address as four decimal numbers (a.b.c.d)")
    return host


# --- Resolving once --------------------------------------------------------


class Resolver(Protocol):
    """Turns a hostname into addresses; tests pass their own."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]: ...


class SystemResolver:
    """The operating system's resolver (getaddrinfo), as a plain connection would use it."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses: list[IPAddress] = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and isinstance(sockaddr[0], str):
                addresses.append(ipaddress.ip_address(sockaddr[0]))
        return addresses


async def resolve_public(
    host: str,
    port: int,
    *,
    resolver: Resolver | None = None,
    allowed_hosts: frozenset[str] = frozenset(),
) -> list[IPAddress]:
    """The addresses to connect to for ``host``, every one of them checked.

    A literal IP is checked as it is; a hostname is resolved exactly once, and
    refused if any of its addresses is not public (one bad address is enough:
    which one a connection would pick is not ours to know). Hosts in
    ``allowed_hosts`` skip the check (tests only). Returns the addresses without
    repeats, in the resolver's order. Raises ``ForbiddenAddress``, or ``OSError``
    when the name does not resolve.
    """
    try:
        literal = parse_literal_ip(host)
    except ValueError:
        raise ForbiddenAddress(_BAD_HOST) from None
    if literal is not None:
        addresses = [literal]
    else:
        answer = await (resolver or SystemResolver()).resolve(host, port)
        addresses = list(dict.fromkeys(answer))
        if not addresses:
            raise OSError(f"{host} resolved to no address")
    if _host_key(host) in {_host_key(h) for h in allowed_hosts}:
        return addresses
    for address in addresses:
        kind = _forbidden_kind(address)
        if kind is not None:
            raise _refuse_internal(host, kind, resolved=literal is None)
    return addresses


# --- Connecting to what was checked ----------------------------------------

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


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections to a host's checked addresses, trying them in order."""

    def __init__(
        self, pins: Mapping[str, Sequence[IPAddress]], inner: httpcore.AsyncNetworkBackend
    ) -> None:
        self._pins = {_host_key(host): tuple(addresses) for host, addresses in pins.items()}
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = self._pins.get(_host_key(host))
        if not addresses:
            raise ForbiddenAddress(f"must not point at a host that was not checked: {host}")
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            try:
                # An address, not a name: the inner backend has nothing left to look up.
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise ForbiddenAddress("must not point at a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            with _as_httpx_errors():
                await aclose()


@functools.lru_cache(maxsize=8)
def _ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    # Built once per bundle: loading the certifi store costs milliseconds per delivery.
    context = httpx.create_ssl_context(trust_env=False)
    if ca_bundle is not None:
        context.load_verify_locations(cafile=ca_bundle)
    return context


class PinnedTransport(httpx.AsyncBaseTransport):
    """Sends each request to the addresses checked for its host, and nowhere else.

    ``pins`` maps a host to its checked addresses (``resolve_public``); a request
    to any other host raises ``ForbiddenAddress`` before a socket is opened. The
    TCP connection goes to a pinned address while TLS sends the URL's hostname
    for SNI and verifies the certificate against it, as for any request. The
    system CA store (certifi) is trusted, plus ``ca_bundle`` when given.
    ``network_backend`` opens the sockets (default: httpcore's anyio backend);
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
    ) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(ca_bundle),
            network_backend=_PinnedBackend(pins, network_backend or httpcore.AnyIOBackend()),
            http1=True,
            http2=False,
            retries=0,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        # sni_hostname would verify the certificate against another name than the URL's.
        extensions = {k: v for k, v in request.extensions.items() if k != "sni_hostname"}
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=extensions,
        )
        with _as_httpx_errors():
            response = await self._pool.handle_async_request(core_request)
        assert isinstance(response.stream, AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


# Describe the body as sent; the body handed back is decoded and may be cut.
_BODY_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})


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
    """
    host = check_url(url, allowed_hosts=allowed_hosts)
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        raise ForbiddenAddress("is not a valid URL") from None
    # The host httpx will connect to must be the one checked: two URL parsers
    # that read a URL differently are a classic way around a guard.
    connect_host = target.raw_host.decode("ascii")
    if _host_key(connect_host) != _host_key(host):
        raise ForbiddenAddress("is not a valid URL")
    port = target.port or 443
    try:
        async with asyncio.timeout(timeout):
            try:
                addresses = await resolve_public(
                    connect_host, port, resolver=resolver, allowed_hosts=allowed_hosts
                )
            except OSError as exc:
                raise httpx.ConnectError(f"could not resolve {connect_host}: {exc}") from exc
            transport = PinnedTransport(
                {connect_host: addresses}, ca_bundle=ca_bundle, network_backend=network_backend
            )
            async with (
                httpx.AsyncClient(
                    transport=transport, trust_env=False, follow_redirects=False, timeout=timeout
                ) as client,
                client.stream(
                    method,
                    target,
                    content=content,
                    # Compressed answers could expand without bound before the cut.
                    headers={"accept-encoding": "identity", **(headers or {})},
                ) as response,
            ):
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= max_response_bytes:
                        break
    except TimeoutError:
        raise httpx.TimeoutException(f"no answer within {timeout} s") from None
    return httpx.Response(
        status_code=response.status_code,
        headers=[
            (name, value)
            for name, value in response.headers.multi_items()
            if name not in _BODY_FRAMING
        ],
        content=bytes(body[:max_response_bytes]),
        request=response.request,
    )
