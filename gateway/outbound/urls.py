"""The form of a URL Tollgate may send to (``check_url``), checked before any lookup.

HTTPS, at most 2048 characters, a well-formed host, no user or password. A
host that is an IP address in any spelling is refused at once if it is
internal; a public one must be written the usual way (``a.b.c.d``), so no two
parsers can read it apart. Callback URLs are checked at submit and again at
delivery; result-image links before they are fetched.
"""

import re
from ipaddress import IPv4Address
from urllib.parse import urlsplit

from gateway.outbound.addresses import (
    BAD_HOST,
    ForbiddenAddress,
    forbidden_kind,
    host_key,
    parse_literal_ip,
    refuse_internal,
)

MAX_URL_LENGTH = 2048

_HOSTNAME = re.compile(r"([a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}\.?")
_MAX_HOSTNAME_LENGTH = 253
# A last label like this can only be meant as an IPv4 address (the WHATWG URL rule).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


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
        raise ForbiddenAddress(BAD_HOST) from None
    if literal is None:
        last_label = host.removesuffix(".").rpartition(".")[2]
        if (
            len(host.removesuffix(".")) > _MAX_HOSTNAME_LENGTH
            or not _HOSTNAME.fullmatch(host)
            or _NUMERIC_LABEL.fullmatch(last_label)
        ):
            raise ForbiddenAddress(BAD_HOST)
        return host
    kind = forbidden_kind(literal)
    if kind is not None and host_key(host) not in {host_key(h) for h in allowed_hosts}:
        raise refuse_internal(host, kind, resolved=False)
    if isinstance(literal, IPv4Address) and str(literal) != host:
        raise ForbiddenAddress("must write an IPv4 address as four decimal numbers (a.b.c.d)")
    return host
