"""Fetching result images from an upstream: untrusted input, checked by its bytes.

Only PNG, JPEG and WebP are stored, recognised by their signatures rather
than by any header the upstream sends; a body larger than the cap is cut off
and refused without being read whole. A link anywhere but the channel's own
host goes through the same address guard as callbacks (``ImageSource``).
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from gateway.outbound import ForbiddenAddress, Resolver, guarded_request
from workers.providers.base import UpstreamBadResult, UpstreamUnavailable

logger = logging.getLogger("tollgate.images")

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
)


def sniff_image(data: bytes) -> str | None:
    """The file extension for image bytes, or None when they are not an image we store."""
    for signature, ext in _SIGNATURES:
        if data.startswith(signature):
            return ext
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass(frozen=True, slots=True)
class ImageSource:
    """Where a run may fetch result images from, and under which rules.

    Links on the channel's own configured host (``trusted_host``) are fetched
    as the adapter talks to it; any other link is untrusted and goes through
    the address guard of ``gateway/outbound/`` (https only, public
    addresses only, checked once and pinned). Redirects are never followed.
    """

    client: httpx.AsyncClient
    trusted_host: str
    max_bytes: int
    timeout: float
    allowed_hosts: frozenset[str] = frozenset()
    ca_bundle: Path | None = None
    resolver: Resolver | None = None  # None: the system's (tests pass their own)


def image_of(data: bytes, max_bytes: int) -> tuple[bytes, str]:
    """Check bytes an upstream returned as an image (downloaded or inline)."""
    if len(data) > max_bytes:
        raise UpstreamBadResult(f"a result image is larger than the {max_bytes}-byte limit")
    ext = sniff_image(data)
    if ext is None:
        raise UpstreamBadResult(
            "the upstream returned something that is not a PNG, JPEG or WebP image"
        )
    return data, ext


async def fetch_image(source: ImageSource, url: str) -> tuple[bytes, str]:
    """Download one result image; returns its bytes and extension."""
    if not url.startswith(("https://", "http://")):
        raise UpstreamBadResult("the upstream returned an image link Tollgate cannot fetch")
    host = (urlsplit(url).hostname or "").lower()
    if host and host == source.trusted_host:
        data, status = await _fetch_trusted(source, url)
    else:
        data, status = await _fetch_guarded(source, url)
    if status != 200:
        raise UpstreamUnavailable(f"the result image could not be downloaded (HTTP {status})")
    return image_of(data, source.max_bytes)


async def _fetch_trusted(source: ImageSource, url: str) -> tuple[bytes, int]:
    try:
        async with source.client.stream(
            "GET", url, follow_redirects=False, timeout=source.timeout
        ) as response:
            if response.status_code != 200:
                return b"", response.status_code
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > source.max_bytes:
                    raise UpstreamBadResult(
                        f"a result image is larger than the {source.max_bytes}-byte limit"
                    )
                chunks.append(chunk)
    except httpx.TimeoutException:
        raise UpstreamUnavailable("the result image download timed out", timed_out=True) from None
    except httpx.TransportError:
        raise UpstreamUnavailable("the result image could not be downloaded") from None
    return b"".join(chunks), 200


async def _fetch_guarded(source: ImageSource, url: str) -> tuple[bytes, int]:
    try:
        response = await guarded_request(
            "GET",
            url,
            timeout=source.timeout,
            allowed_hosts=source.allowed_hosts,
            ca_bundle=source.ca_bundle,
            resolver=source.resolver,
            # One byte over the cap is enough to know the image is too large.
            max_response_bytes=source.max_bytes + 1,
        )
    except ForbiddenAddress as exc:
        # The reason names the host; it goes to the operator's log, not the tenant's task.
        logger.warning("result image link refused: it %s", exc.reason)
        raise UpstreamBadResult(
            "a result image link was refused: it points at an address Tollgate does not fetch"
        ) from None
    except httpx.TimeoutException:
        raise UpstreamUnavailable("the result image download timed out", timed_out=True) from None
    except httpx.HTTPError:
        raise UpstreamUnavailable("the result image could not be downloaded") from None
    return response.content, response.status_code
