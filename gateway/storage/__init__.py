"""Result storage and the links that serve it.

Workers ``put`` result images under ``<task id>/<index>.<ext>``; clients get
links that end at the task's ``expires_at``: served by the gateway
(``/v1/files/<key>?expires&signature``) or, with
``TOLLGATE_STORAGE_PRESIGNED_LINKS``, presigned URLs of the bucket itself.

``TOLLGATE_STORAGE_URL`` picks the backend: ``file:///path`` (``LocalStorage``,
a directory every gateway and worker shares; the default, at
``TOLLGATE_STORAGE_DIR``) or ``s3://bucket/prefix`` (``S3Storage``). Both
implement ``Storage`` (``base.py``, with the rules every backend keeps).
Retention (``workers/retention.py``) deletes a task's objects once its links
have expired and ``TOLLGATE_RESULT_GRACE_SECONDS`` more have passed.
"""

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from gateway.settings import Settings, SettingsError
from gateway.storage.base import (
    CONTENT_TYPES,
    Deleted,
    Storage,
    StorageUnavailable,
    StoredObject,
    check_key,
)
from gateway.storage.links import UrlSigner
from gateway.storage.local import LocalStorage
from gateway.storage.presign import S3Presigner
from gateway.storage.s3 import S3Location, S3Storage

__all__ = [
    "CONTENT_TYPES",
    "Deleted",
    "LocalStorage",
    "S3Location",
    "S3Presigner",
    "S3Storage",
    "Storage",
    "StorageUnavailable",
    "StoredObject",
    "UrlSigner",
    "build_signer",
    "build_storage",
    "check_key",
    "s3_location",
]


def s3_location(settings: Settings, environ: Mapping[str, str] | None = None) -> S3Location | None:
    """Where the bucket is, for an ``s3://`` storage URL; None for a directory."""
    url = settings.storage_url
    if url is None or not url.startswith("s3://"):
        return None
    return S3Location.resolve(
        url,
        endpoint=settings.storage_endpoint_url,
        region=settings.storage_region,
        addressing_style=settings.storage_addressing_style,
        access_key_id=settings.storage_access_key_id,
        secret_access_key=settings.storage_secret_access_key,
        environ=environ,
    )


def build_storage(settings: Settings) -> Storage:
    location = s3_location(settings)
    if location is not None:
        return S3Storage(location, timeout_seconds=settings.storage_timeout_seconds)
    if settings.storage_url is None:
        return LocalStorage(settings.storage_dir)
    return LocalStorage(Path(unquote(urlsplit(settings.storage_url).path)))


def build_signer(settings: Settings, environ: Mapping[str, str] | None = None) -> UrlSigner:
    """The links of this deployment; SettingsError when presigning cannot work."""
    presigner = None
    if settings.storage_presigned_links:
        location = s3_location(settings, environ)
        if location is None:
            raise SettingsError(
                "TOLLGATE_STORAGE_PRESIGNED_LINKS: needs an s3:// TOLLGATE_STORAGE_URL"
            )
        if not (location.access_key_id and location.secret_access_key):
            raise SettingsError(
                "TOLLGATE_STORAGE_PRESIGNED_LINKS: needs an access key id and secret "
                "(TOLLGATE_STORAGE_ACCESS_KEY_ID and TOLLGATE_STORAGE_SECRET_ACCESS_KEY, "
                "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        presigner = S3Presigner(location, settings.result_url_ttl_seconds)
    return UrlSigner(settings.signing_secret, settings.public_base_url, presigner)
