"""The simulator's images: its PNG encoder, read back by a strict decoder, and its size table."""

import struct
import time
import zlib

import pytest

from workers.simulator.png import PNG_SIGNATURE, png_size, render_png
from workers.simulator.sizes import ASPECT_RATIOS, SIZES, image_size


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """A strict little reader: checks every chunk CRC and returns (width, height, RGB rows)."""
    assert data.startswith(PNG_SIGNATURE)
    pos, chunks = len(PNG_SIGNATURE), []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 3 * width
    assert len(raw) == height * (stride + 1)
    rows: list[bytes] = []
    for y in range(height):
        kind, line = raw[y * (stride + 1)], raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]
        if kind == 2:  # Up: add the row above, byte by byte
            line = bytes((a + b) & 0xFF for a, b in zip(line, rows[-1], strict=True))
        else:
            assert kind == 0, f"unexpected filter {kind}"
        rows.append(line)
    return width, height, rows


# --- PNG encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height"), [(1, 1), (5, 1), (1, 7), (333, 97), (1024, 1024), (1568, 672)]
)
@pytest.mark.parametrize("seed", [0, 7, 123456])
def test_render_png_is_a_valid_rgb_png_of_the_requested_size(
    width: int, height: int, seed: int
) -> None:
    data = render_png(width, height, prompt="odd sizes", seed=seed, index=1)
    # decode_png checks every CRC, and zlib.decompress the stream's Adler-32.
    assert decode_png(data)[:2] == (width, height) == png_size(data)


def test_render_png_draws_bands_of_gradients() -> None:
    rows = decode_png(render_png(256, 300, prompt="bands", seed=3, index=0))[2]
    assert 3 <= len(set(rows)) <= 11
    assert len({rows[0][i : i + 3] for i in range(0, len(rows[0]), 3)}) > 2


def test_render_png_is_deterministic_and_depends_on_every_input() -> None:
    first = render_png(64, 48, prompt="a cat", seed=1, index=0)
    assert render_png(64, 48, prompt="a cat", seed=1, index=0) == first
    others = [
        render_png(64, 48, prompt="a dog", seed=1, index=0),
        render_png(64, 48, prompt="a cat", seed=2, index=0),
        render_png(64, 48, prompt="a cat", seed=1, index=1),
    ]
    pixels = decode_png(first)[2]
    assert all(decode_png(other)[2] != pixels for other in others)


def test_render_png_is_fast_enough_to_serve() -> None:
    def best_of_three(size: int) -> float:
        timings = []
        for attempt in range(3):
            start = time.perf_counter()
            render_png(size, size, prompt="speed", seed=attempt, index=0)
            timings.append(time.perf_counter() - start)
        return min(timings)

    assert best_of_three(1024) < 0.1
    assert best_of_three(2048) < 0.5


@pytest.mark.parametrize("data", [b"", b"GIF89a" + bytes(30), PNG_SIGNATURE + bytes(16)])
def test_png_size_rejects_what_is_not_a_png(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(data)


# --- size table ------------------------------------------------------------------------------


def test_size_table_matches_the_provider_table_and_caps_4k_at_4096() -> None:
    assert len(ASPECT_RATIOS) == 12
    assert len(SIZES) == 36
    assert image_size("1:1", "1K") == (1024, 1024)
    assert image_size("5:4", "1K") == (1152, 896)
    assert image_size("5:4", "2K") == (2240, 1792)
    assert image_size("9:16", "2K") == (1472, 2688)
    assert image_size("2.35:1", "1K") == (1568, 672)
    assert image_size("2.35:1", "2K") == (3136, 1344)
    assert image_size("1:1", "4K") == (4096, 4096)
    assert image_size("16:9", "4K") == (4096, 2304)
    assert image_size("3:2", "4K") == (4096, 2720)
    assert image_size("2:3", "4K") == (2720, 4096)
    for ratio in ASPECT_RATIOS:
        assert max(SIZES[ratio, "4K"]) == 4096
    assert image_size("7:3", "1K") is None
    assert image_size("1:1", "8K") is None
