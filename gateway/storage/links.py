"""Result links: signed gateway URLs, or presigned object-store URLs with the same expiry.

A gateway link is ``/v1/files/<key>?expires=<unix>&signature=<hmac>``, the
signature HMAC-SHA256 over the key and expiry with ``TOLLGATE_SIGNING_SECRET``,
so every gateway process checks a link without any lookup, and a link stops
working at its expiry whatever the task's state. With
``TOLLGATE_STORAGE_PRESIGNED_LINKS`` the same call returns an S3 presigned URL
(``gateway/storage/presign.py``) ending at the same second; the gateway still
verifies its own links, so links handed out before a switch keep working.
"""

import base64
import hashlib
import hmac
from typing import Protocol
from urllib.parse import urlencode

from gateway.errors import LinkExpired, NotFound


class Presigner(Protocol):
    def url(self, key: str, expires: int) -> str: ...


class UrlSigner:
    def __init__(self, secret: str, base_url: str, presigner: Presigner | None = None) -> None:
        self._secret = secret.encode()
        self._base_url = base_url
        self._presigner = presigner

    def _signature(self, key: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def url(self, key: str, expires: int) -> str:
        """The link clients get for ``key``, valid until ``expires`` (Unix seconds)."""
        if self._presigner is not None:
            return self._presigner.url(key, expires)
        return self.gateway_url(key, expires)

    def gateway_url(self, key: str, expires: int) -> str:
        query = urlencode({"expires": expires, "signature": self._signature(key, expires)})
        return f"{self._base_url}/v1/files/{key}?{query}"

    def verify(self, key: str, expires: str | None, signature: str | None, now: float) -> None:
        """Raise NotFound for a link that was not signed by us, LinkExpired for an old one."""
        if not expires or not signature or not expires.isdigit():
            raise NotFound("File not found")
        expected = self._signature(key, int(expires))
        if not hmac.compare_digest(expected, signature):
            raise NotFound("File not found")
        if int(expires) <= now:
            raise LinkExpired("This link has expired; results are kept for a limited time")
