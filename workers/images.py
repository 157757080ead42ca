"""Fetching result images from an upstream: untrusted input, checked by its bytes.

Only PNG, JPEG and WebP are stored, recognised by their signatures rather
than by any header the upstream sends; a body larger than the cap is cut off
and refused without being read whole. Each image's width and height, read from
its own header, must be the size the request asked for within a tolerance
(``checked_size``: each side within 5 % or 32 px, the aspect ratio within 3 %);
anything else is ``UpstreamBadResult``, which fails over and is never charged.
A link anywhere but the channel's own host goes through the same address guard
as callbacks (``ImageSource``).
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


# A result matches the request's size when each side is within this share of the side
# asked for (or SIZE_TOLERANCE_PIXELS, whichever is larger: upstreams round sides to
# multiples of 8 to 64 px) and its aspect ratio within ASPECT_TOLERANCE of the one asked for.
SIZE_TOLERANCE = 0.05
SIZE_TOLERANCE_PIXELS = 32
ASPECT_TOLERANCE = 0.03

# JPEG start-of-frame markers (the frame's size); C4, C8 and CC are other segments.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# JPEG markers with no length after them.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def image_size(data: bytes, ext: str) -> tuple[int, int] | None:
    """(width, height) read from an image's header, or None when it cannot be read."""
    if ext == "png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    if ext == "jpg":
        return _jpeg_size(data)
    if ext == "webp":
        return _webp_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _JPEG_FRAMES:
            if pos + 9 > len(data):
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height
        if length < 2:
            return None
        pos += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
        return width, height
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def _side_matches(got: int, asked: int) -> bool:
    return abs(got - asked) <= max(SIZE_TOLERANCE_PIXELS, SIZE_TOLERANCE * asked)


def checked_size(data: bytes, ext: str, asked: tuple[int, int]) -> tuple[int, int]:
    """The image's (width, height), if they are the size asked for within the tolerance.

    Otherwise ``UpstreamBadResult``: the upstream did not make what it was paid for.
    """
    size = image_size(data, ext)
    if size is None or min(size) <= 0:
        raise UpstreamBadResult("the upstream returned an image whose size cannot be read")
    (width, height), (want_w, want_h) = size, asked
    ratio, want_ratio = width / height, want_w / want_h
    if (
        not _side_matches(width, want_w)
        or not _side_matches(height, want_h)
        or abs(ratio - want_ratio) > ASPECT_TOLERANCE * want_ratio
    ):
        raise UpstreamBadResult(
            f"the upstream returned a {width}x{height} image for a {want_w}x{want_h} request"
        )
    return width, height
