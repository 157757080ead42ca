"""Fetching result images from an upstream: untrusted input, checked by its bytes.

Only PNG, JPEG and WebP are stored, recognised by their signatures rather
than by any header the upstream sends; a body larger than the cap is cut off
and refused without being read whole.
"""

import httpx

from workers.providers.base import UpstreamBadResult, UpstreamUnavailable

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


async def fetch_image(client: httpx.AsyncClient, url: str, *, max_bytes: int) -> tuple[bytes, str]:
    """Download one result image; returns its bytes and extension."""
    if not url.startswith(("https://", "http://")):
        raise UpstreamBadResult("the upstream returned an image link Tollgate cannot fetch")
    try:
        async with client.stream("GET", url, follow_redirects=False) as response:
            if response.status_code != 200:
                raise UpstreamUnavailable(
                    f"the result image could not be downloaded (HTTP {response.status_code})"
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise UpstreamBadResult(
                        f"a result image is larger than the {max_bytes}-byte limit"
                    )
                chunks.append(chunk)
    except httpx.TimeoutException:
        raise UpstreamUnavailable("the result image download timed out") from None
    except httpx.TransportError:
        raise UpstreamUnavailable("the result image could not be downloaded") from None
    data = b"".join(chunks)
    ext = sniff_image(data)
    if ext is None:
        raise UpstreamBadResult(
            "the upstream returned something that is not a PNG, JPEG or WebP image"
        )
    return data, ext
