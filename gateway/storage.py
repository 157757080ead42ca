"""Result storage and the signed links that serve it.

Workers ``put`` result images under a key (``<task id>/<index>.<ext>``); the
gateway serves them at ``/v1/files/<key>?expires=<unix>&signature=<hmac>``.
The signature is HMAC-SHA256 over the path and expiry with
``TOLLGATE_SIGNING_SECRET``, so every gateway process can check a link without
any lookup, and a link stops working at its expiry whatever the task's state.

``Storage`` is the seam: ``LocalStorage`` keeps files in a directory (shared
by gateways and workers on one host or a shared volume); an S3-compatible store
implements the same three methods.
"""

import asyncio
import base64
import hashlib
import hmac
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlencode

from gateway.errors import LinkExpired, NotFound

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_KEY = re.compile(r"^[A-Za-z0-9_\-]+/[0-9]+\.(png|jpg|webp)$")


class Storage(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"not a storage key: {key!r}")
    return key


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file, and a job that
        # runs twice simply replaces the same key with the same bytes.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, key, data)

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._read, key)

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class UrlSigner:
    def __init__(self, secret: str, base_url: str) -> None:
        self._secret = secret.encode()
        self._base_url = base_url

    def _signature(self, key: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def url(self, key: str, expires: int) -> str:
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
