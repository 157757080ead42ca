"""Checks on a callback URL at submit time (``callback_url`` / ``X-Webhook-URL``).

Only the form is checked here: HTTPS, at most 2048 characters, a host, no
credentials. Where it may connect is decided again at delivery time.
"""

from urllib.parse import urlsplit

from gateway.errors import InvalidRequest

MAX_CALLBACK_URL_LENGTH = 2048


def validate_callback_url(url: str, field: str = "callback_url") -> str:
    if len(url) > MAX_CALLBACK_URL_LENGTH:
        raise InvalidRequest(field, f"must be at most {MAX_CALLBACK_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError:
        raise InvalidRequest(field, "is not a valid URL") from None
    if parts.scheme != "https":
        raise InvalidRequest(field, "must be an https:// URL")
    if not host:
        raise InvalidRequest(field, "must name a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(field, "must not contain a user name or password")
    return url
