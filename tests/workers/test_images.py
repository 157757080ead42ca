"""Result images are untrusted input: fetched over the address guard unless they live on the
channel's own host, never through a redirect, within a size cap, and stored only when their
bytes are a PNG, JPEG or WebP. Real servers on loopback: the simulator and an HTTPS receiver."""

from collections.abc import AsyncIterator

import httpx
import pytest
from conftest import SIM_KEY
from https_receiver import HOST, LOOPBACK, Answer, FakeResolver, Receiver

from workers.images import (
    ImageSource,
    checked_size,
    fetch_image,
    image_of,
    image_size,
    sniff_image,
)
from workers.providers.base import UpstreamBadResult, UpstreamUnavailable
from workers.simulator.png import render_png

PNG = render_png(64, 48, prompt="a test image", seed=3, index=0)
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 32


def test_images_are_recognised_by_their_bytes() -> None:
    assert sniff_image(PNG) == "png"
    assert sniff_image(JPEG) == "jpg"
    assert sniff_image(WEBP) == "webp"
    for other in (b"", b"<html>", b"GIF89a" + b"\x00" * 20, b"RIFF\x00\x00\x00\x00WAVE"):
        assert sniff_image(other) is None
    with pytest.raises(UpstreamBadResult, match="not a PNG, JPEG or WebP"):
        image_of(b"<html>502</html>", 1024)
    with pytest.raises(UpstreamBadResult, match="larger than the 100-byte limit"):
        image_of(PNG, 100)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


def source(
    http: httpx.AsyncClient,
    receiver: Receiver | None = None,
    *,
    trusted_host: str = "upstream.example",
    max_bytes: int = 1_000_000,
    allow_receiver: bool = True,
) -> ImageSource:
    return ImageSource(
        client=http,
        trusted_host=trusted_host,
        max_bytes=max_bytes,
        timeout=5.0,
        # The receiver is on loopback: exempt it from the internal-address refusal,
        # as callback tests do, and resolve its name without asking the system.
        allowed_hosts=frozenset({HOST}) if allow_receiver else frozenset(),
        ca_bundle=receiver.cert.cert if receiver else None,
        resolver=FakeResolver({HOST: [[LOOPBACK]]}),
    )


async def simulated_image(http: httpx.AsyncClient, simulator_url: str) -> str:
    """A completed simulator job's first image link (on the simulator's own host)."""
    created = await http.post(
        f"{simulator_url}/generate/image/krea/krea-2/medium",
        json={"prompt": "a lighthouse"},
        headers={"Authorization": f"Bearer {SIM_KEY}"},
    )
    job_id = created.json()["job_id"]
    while True:
        job = (
            await http.get(
                f"{simulator_url}/jobs/{job_id}", headers={"Authorization": f"Bearer {SIM_KEY}"}
            )
        ).json()
        if job["status"] == "completed":
            url: str = job["result"]["urls"][0]
            return url


async def test_a_link_on_the_channels_own_host_is_fetched_directly(
    http: httpx.AsyncClient, simulator_url: str
) -> None:
    url = await simulated_image(http, simulator_url)
    data, ext = await fetch_image(source(http, trusted_host="127.0.0.1"), url)
    assert ext == "png"
    assert data.startswith(b"\x89PNG")
    # The same link is not trusted for a channel on another host: plain http is refused.
    with pytest.raises(UpstreamBadResult, match="refused") as refused:
        await fetch_image(source(http), url)
    assert "127.0.0.1" not in refused.value.message


async def test_a_trusted_link_over_the_size_cap_is_cut_off_and_refused(
    http: httpx.AsyncClient, simulator_url: str
) -> None:
    url = await simulated_image(http, simulator_url)
    with pytest.raises(UpstreamBadResult, match="larger than the 2048-byte limit"):
        await fetch_image(source(http, trusted_host="127.0.0.1", max_bytes=2048), url)


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/x.png",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/x.png",
        "https://10.0.0.8/x.png",
        "https://2130706433/x.png",
    ],
)
async def test_a_link_to_an_internal_address_is_refused_without_a_connection(
    http: httpx.AsyncClient, receiver: Receiver, url: str
) -> None:
    before = receiver.connections
    with pytest.raises(UpstreamBadResult, match="refused") as refused:
        await fetch_image(source(http, receiver), url)
    assert receiver.connections == before
    # The tenant reads this message: it names no host or address.
    host = url.split("/")[2].strip("[]")
    assert host not in refused.value.message


async def test_a_name_that_resolves_to_loopback_is_refused(
    http: httpx.AsyncClient, receiver: Receiver
) -> None:
    url = receiver.script("/img.png", [Answer(body=PNG)])
    before = receiver.connections
    with pytest.raises(UpstreamBadResult, match="refused") as refused:
        await fetch_image(source(http, receiver, allow_receiver=False), url)
    assert HOST not in refused.value.message
    assert receiver.connections == before


async def test_an_untrusted_link_is_fetched_through_the_guard(
    http: httpx.AsyncClient, receiver: Receiver
) -> None:
    url = receiver.script("/cdn/0.png", [Answer(body=PNG)])
    data, ext = await fetch_image(source(http, receiver), url)
    assert (data, ext) == (PNG, "png")


async def test_a_redirect_is_never_followed(http: httpx.AsyncClient, receiver: Receiver) -> None:
    target = receiver.script("/internal.png", [Answer(body=PNG)])
    url = receiver.script("/moved.png", [Answer(status=302, location=target)])
    with pytest.raises(UpstreamUnavailable, match=r"HTTP 302"):
        await fetch_image(source(http, receiver), url)
    assert receiver.at("/internal.png") == []


async def test_an_untrusted_body_over_the_cap_or_not_an_image_is_refused(
    http: httpx.AsyncClient, receiver: Receiver
) -> None:
    big = receiver.script("/big.png", [Answer(body=PNG)])
    with pytest.raises(UpstreamBadResult, match="larger than the 100-byte limit"):
        await fetch_image(source(http, receiver, max_bytes=100), big)
    page = receiver.script("/page.png", [Answer(body=b"<html><body>hello</body></html>")])
    with pytest.raises(UpstreamBadResult, match="not a PNG, JPEG or WebP"):
        await fetch_image(source(http, receiver), page)


# --- the size of what came back ------------------------------------------------------------


def jpeg_of(width: int, height: int) -> bytes:
    """A JPEG's head: SOI, an APP0 segment, then a baseline frame header with the size."""
    app0 = b"\xff\xe0" + (16).to_bytes(2, "big") + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    frame = b"\xff\xc0" + (17).to_bytes(2, "big") + b"\x08"
    frame += height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03" + b"\x00" * 9
    return b"\xff\xd8" + app0 + frame + b"\xff\xd9"


def webp_of(kind: bytes, width: int, height: int) -> bytes:
    if kind == b"VP8 ":
        body = b"\x00\x00\x00\x9d\x01\x2a" + width.to_bytes(2, "little")
        body += height.to_bytes(2, "little")
    elif kind == b"VP8L":
        bits = (width - 1) | ((height - 1) << 14)
        body = b"\x2f" + bits.to_bytes(4, "little")
    else:
        body = b"\x00" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body += b"\x00" * 8
    return (
        b"RIFF"
        + (len(body) + 12).to_bytes(4, "little")
        + b"WEBP"
        + kind
        + len(body).to_bytes(4, "little")
        + body
    )


@pytest.mark.parametrize(
    ("data", "ext"),
    [
        (render_png(2048, 1152, prompt="p", seed=1, index=0), "png"),
        (jpeg_of(2048, 1152), "jpg"),
        (webp_of(b"VP8 ", 2048, 1152), "webp"),
        (webp_of(b"VP8L", 2048, 1152), "webp"),
        (webp_of(b"VP8X", 2048, 1152), "webp"),
    ],
)
def test_every_stored_format_gives_its_size_and_a_wrong_size_is_a_bad_result(
    data: bytes, ext: str
) -> None:
    assert sniff_image(data) == ext
    assert image_size(data, ext) == (2048, 1152)
    assert checked_size(data, ext, (2048, 1152)) == (2048, 1152)
    # Rounded by an upstream to its own multiple: within the tolerance.
    assert checked_size(data, ext, (2040, 1148)) == (2048, 1152)
    # What flux-1-1-pro-ultra was seen to answer for 2048x1152: refused.
    with pytest.raises(UpstreamBadResult, match="a 2048x1152 image for a 1024x768 request"):
        checked_size(data, ext, (1024, 768))
    # The right width, another aspect ratio.
    with pytest.raises(UpstreamBadResult):
        checked_size(data, ext, (2048, 2048))


def test_the_tolerance_is_5_percent_or_32_px_per_side_and_3_percent_of_aspect() -> None:
    square = render_png(1024, 1024, prompt="p", seed=1, index=0)
    assert checked_size(square, "png", (1000, 1000)) == (1024, 1024)  # 24 px off
    assert checked_size(square, "png", (1056, 1056)) == (1024, 1024)  # 32 px off
    with pytest.raises(UpstreamBadResult):
        checked_size(square, "png", (1080, 1080))  # 56 px, more than 5 %
    with pytest.raises(UpstreamBadResult):
        checked_size(square, "png", (1024, 992))  # each side close, the ratio 3.2 % off
    small = render_png(256, 256, prompt="p", seed=1, index=0)
    assert checked_size(small, "png", (224, 224)) == (256, 256)  # 32 px is the floor


@pytest.mark.parametrize(
    ("data", "ext"), [(JPEG, "jpg"), (WEBP, "webp"), (PNG[:20], "png"), (b"\xff\xd8", "jpg")]
)
def test_an_image_whose_size_cannot_be_read_is_a_bad_result(data: bytes, ext: str) -> None:
    assert image_size(data, ext) is None
    with pytest.raises(UpstreamBadResult, match="size cannot be read"):
        checked_size(data, ext, (64, 48))
