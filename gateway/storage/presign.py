"""Presigned S3 GET links (AWS Signature Version 4, query form), computed locally.

Rules:
- A link ends at the task's ``expires_at`` to the second: it is signed as of
  ``expires_at - TOLLGATE_RESULT_URL_TTL_SECONDS`` (the moment the task completed)
  for that many seconds, so the same task gives the same URL on every read, in
  its callback as in ``GET /v1/tasks/{id}``. SigV4 allows at most seven days.
- Signing needs a long-lived access key and secret (settings or the standard AWS
  variables): a link signed with temporary credentials (a role's session token)
  stops working when they expire, however long the link says it lasts.
"""

import hashlib
import hmac
import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from gateway.storage.s3 import S3Location

MAX_EXPIRES_SECONDS = 7 * 24 * 3600
_ALGORITHM = "AWS4-HMAC-SHA256"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _quote(text: str, safe: str = "-_.~") -> str:
    return quote(text, safe=safe)


class S3Presigner:
    def __init__(
        self, location: S3Location, ttl_seconds: int, clock: Callable[[], float] = time.time
    ) -> None:
        if not location.access_key_id or not location.secret_access_key:
            raise ValueError("presigned links need an access key id and a secret access key")
        self._loc = location
        self._key_id = location.access_key_id
        self._secret = location.secret_access_key
        self._ttl = ttl_seconds
        self._clock = clock

    def url(self, key: str, expires: int) -> str:
        start = expires - self._ttl
        now = int(self._clock())
        if start > now:
            # The TTL was shortened since the task completed: sign from now instead.
            start = now
        window = max(1, min(expires - start, MAX_EXPIRES_SECONDS))
        return self.sign(key, start, window)

    def sign(self, key: str, start: int, window: int) -> str:
        """A GET link for ``key``, signed as of Unix second ``start``, valid ``window`` seconds."""
        loc = self._loc
        base = urlsplit(loc.endpoint_or_default)
        host = base.netloc
        object_key = f"{loc.prefix}/{key}" if loc.prefix else key
        if loc.virtual_hosted:
            host = f"{loc.bucket}.{host}"
            path = f"{base.path.rstrip('/')}/{object_key}"
        else:
            path = f"{base.path.rstrip('/')}/{loc.bucket}/{object_key}"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start))
        scope = f"{stamp[:8]}/{loc.region}/s3/aws4_request"
        params = {
            "X-Amz-Algorithm": _ALGORITHM,
            "X-Amz-Credential": f"{self._key_id}/{scope}",
            "X-Amz-Date": stamp,
            "X-Amz-Expires": str(window),
            "X-Amz-SignedHeaders": "host",
        }
        if loc.session_token:
            params["X-Amz-Security-Token"] = loc.session_token
        query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(params.items()))
        canonical_uri = _quote(path, safe="/-_.~")
        canonical = "\n".join(
            ["GET", canonical_uri, query, f"host:{host}\n", "host", "UNSIGNED-PAYLOAD"]
        )
        to_sign = "\n".join(
            [_ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signing_key = _hmac(("AWS4" + self._secret).encode(), stamp[:8])
        for part in (loc.region, "s3", "aws4_request"):
            signing_key = _hmac(signing_key, part)
        signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
        return f"{base.scheme}://{host}{canonical_uri}?{query}&X-Amz-Signature={signature}"
