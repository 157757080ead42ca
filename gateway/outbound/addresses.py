"""Which addresses Tollgate may send to: IP literals in every spelling, and one lookup.

- **Literals** (``parse_literal_ip``): a host that is an IP address in any
  spelling the C resolver accepts (``2130706433``, ``0x7f.1``,
  ``017700000001``, ``127.1``) is read as that address.
- **Public only** (``is_public``): refused are loopback, private (10/8,
  172.16/12, 192.168/16), link-local (169.254/16, cloud metadata among them),
  shared (100.64/10), 0.0.0.0/8, multicast, broadcast, 240/4, the
  documentation, benchmarking and protocol ranges; in IPv6 ``::``, ``::1``,
  ``fc00::/7``, ``fe80::/10``, ``fec0::/10``, multicast, the deprecated
  IPv4-compatible ``::/96`` and everything outside ``2000::/3``. An IPv6
  address that embeds an IPv4 one (mapped ``::ffff:0:0/96``, NAT64
  ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo ``2001::/32``: server and
  client) is judged by what it embeds, because that is where the packets end
  up. ``ipaddress.is_global`` is not used: in Python 3.11 it neither unwraps
  these forms nor refuses multicast.
- **One lookup** (``resolve_public``): a hostname is resolved once and refused
  if *any* of its addresses is not public; the connection then goes only to
  those addresses (``transport.py``).
  ``CheckedAnswers`` may keep a checked answer a few seconds (the callback
  worker's, one second), so a busy receiver is not looked up per request.

Every refusal raises ``ForbiddenAddress``: retrying cannot help. Its message
names the host and the kind of address, never the addresses a name resolved to.
"""

import asyncio
import ipaddress
import re
import socket
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol, TypeAlias

IPAddress: TypeAlias = IPv4Address | IPv6Address


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


def forbidden_kind(ip: IPAddress) -> str | None:
    """What kind of non-public address ``ip`` is ("a loopback address"); None if public."""
    if isinstance(ip, IPv4Address):
        return next((what for network, what in _IPV4_FORBIDDEN if ip in network), None)
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        form, inner = embedded
        for address in inner:
            what = forbidden_kind(address)
            if what is not None:
                return f"{what} in {form} form"
        return None
    for network, what in _IPV6_FORBIDDEN:
        if ip in network:
            return what
    return None if ip in _IPV6_GLOBAL_UNICAST else "a reserved address"


def is_public(ip: IPAddress) -> bool:
    """Whether ``ip`` is global unicast, judging embedded IPv4 addresses by themselves."""
    return forbidden_kind(ip) is None


BAD_HOST = (
    "must name a valid host: letters, digits, hyphens and dots "
    "(xn-- for international names), or an IP address"
)


def host_key(host: str) -> str:
    """``host`` as a connection sees it: lower case, no brackets, no root dot, IPs canonical."""
    host = host.lower().removeprefix("[").removesuffix("]").removesuffix(".")
    try:
        literal = parse_literal_ip(host)
    except ValueError:
        return host
    return host if literal is None else str(literal)


def refuse_internal(host: str, kind: str, *, resolved: bool) -> ForbiddenAddress:
    verb = "resolves to" if resolved else "is"
    return ForbiddenAddress(f"must not point at an internal address: {host} {verb} {kind}")


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
        raise ForbiddenAddress(BAD_HOST) from None
    if literal is not None:
        addresses = [literal]
    else:
        answer = await (resolver or SystemResolver()).resolve(host, port)
        addresses = list(dict.fromkeys(answer))
        if not addresses:
            raise OSError(f"{host} resolved to no address")
    if host_key(host) in {host_key(h) for h in allowed_hosts}:
        return addresses
    for address in addresses:
        kind = forbidden_kind(address)
        if kind is not None:
            raise refuse_internal(host, kind, resolved=literal is None)
    return addresses


class CheckedAnswers:
    """``resolve_public`` with its answers kept ``seconds`` (0: a lookup every time).

    Only an answer that passed the check is kept, so a refused host is looked up
    (and refused) again each time; ``forget`` drops a host's answer (its
    connection failed: it may have moved). At most ``max_hosts`` answers are kept.
    """

    def __init__(
        self,
        seconds: float,
        *,
        resolver: Resolver | None = None,
        allowed_hosts: frozenset[str] = frozenset(),
        max_hosts: int = 256,
    ) -> None:
        self._seconds = seconds
        self._resolver = resolver
        self._allowed_hosts = allowed_hosts
        self._max_hosts = max_hosts
        # (host key, port) -> (time.monotonic() it expires at, the checked addresses)
        self._kept: dict[tuple[str, int], tuple[float, list[IPAddress]]] = {}

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        if self._seconds <= 0:
            return await resolve_public(
                host, port, resolver=self._resolver, allowed_hosts=self._allowed_hosts
            )
        key, now = (host_key(host), port), time.monotonic()
        kept = self._kept.get(key)
        if kept is not None and now < kept[0]:
            return kept[1]
        addresses = await resolve_public(  # raises for a refused host: nothing kept
            host, port, resolver=self._resolver, allowed_hosts=self._allowed_hosts
        )
        if len(self._kept) >= self._max_hosts:
            self._kept = {k: v for k, v in self._kept.items() if now < v[0]}
            if len(self._kept) >= self._max_hosts:
                self._kept.pop(next(iter(self._kept)))
        self._kept[key] = (now + self._seconds, addresses)
        return addresses

    def forget(self, host: str, port: int) -> None:
        self._kept.pop((host_key(host), port), None)

    def clear(self) -> None:
        self._kept.clear()
