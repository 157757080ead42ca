"""Checks on a callback URL at submit time (``callback_url`` / ``X-Webhook-URL``).

The form is checked here, by the rules of ``gateway/outbound/``: HTTPS, at
most 2048 characters, a well-formed host, no credentials, and no internal IP
address written into the URL in any spelling (``127.1``, ``2130706433``,
``[::ffff:127.0.0.1]``). A hostname is not looked up at submit: where it may
connect is decided at delivery time, when it is resolved and checked again.
"""

from gateway import outbound
from gateway.errors import InvalidRequest

MAX_CALLBACK_URL_LENGTH = outbound.MAX_URL_LENGTH


def validate_callback_url(
    url: str, field: str = "callback_url", *, allowed_hosts: frozenset[str] = frozenset()
) -> str:
    """``url`` if a callback may be sent there; ``InvalidRequest`` naming ``field`` if not.

    ``allowed_hosts`` is ``Settings.outbound_allowed_hosts`` (tests with local receivers).
    """
    try:
        outbound.check_url(url, allowed_hosts=allowed_hosts)
    except outbound.ForbiddenAddress as exc:
        raise InvalidRequest(field, exc.reason) from None
    return url
