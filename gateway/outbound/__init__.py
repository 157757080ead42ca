"""Outbound HTTP: the guard between Tollgate and the URLs others name.

Tenants choose where their callbacks go, and upstreams may answer with links
to their result images: each is a request Tollgate makes on a stranger's
behalf, from inside our network. Every such request goes through this
package, under these rules:

- **Form** (``urls.py``): HTTPS, at most 2048 characters, a well-formed host,
  no user or password; an internal IP literal, in any spelling, refused at once.
- **Addresses** (``addresses.py``): the host is resolved once and refused if
  *any* address is not global unicast (embedded IPv4 forms judged by what they
  embed).
- **Connection** (``guarded.py`` on ``transport.py``; the HTTP/1.1 exchange in
  ``h1.py``, its sockets in ``sockets.py``): only to the addresses that were checked, TLS
  verified against the hostname, no proxy from the environment, no redirects,
  one time budget, the answer's body cut.
  ``GuardedClient`` keeps connections alive between requests, each request
  still checked, a kept connection reused only while its host resolves to the
  addresses it was pinned to (a checked answer may serve a host's requests for
  ``answer_seconds``).
- ``allowed_hosts`` exempts chosen hosts from the internal-address refusal
  (the form rules still apply): for tests with local receivers only
  (``Settings.outbound_allowed_hosts``). ``ca_bundle`` adds CA certificates to
  trust (``Settings.outbound_ca_bundle``).

Every refusal raises ``ForbiddenAddress``: retrying cannot help. Network
failures are httpx errors, as from any httpx client. This package imports
nothing else of ours, so gateway and workers alike may use it.
"""

from gateway.outbound.addresses import (
    ForbiddenAddress,
    IPAddress,
    Resolver,
    SystemResolver,
    is_public,
    parse_literal_ip,
    resolve_public,
)
from gateway.outbound.client import OutboundClient
from gateway.outbound.guarded import GuardedClient, guarded_post, guarded_request
from gateway.outbound.transport import MAX_RESPONSE_BYTES, PinnedTransport, StreamsTransport
from gateway.outbound.urls import MAX_URL_LENGTH, check_url

__all__ = [
    "MAX_RESPONSE_BYTES",
    "MAX_URL_LENGTH",
    "ForbiddenAddress",
    "GuardedClient",
    "IPAddress",
    "OutboundClient",
    "PinnedTransport",
    "Resolver",
    "StreamsTransport",
    "SystemResolver",
    "check_url",
    "guarded_post",
    "guarded_request",
    "is_public",
    "parse_literal_ip",
    "resolve_public",
]
