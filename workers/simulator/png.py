"""A tiny deterministic PNG encoder (stdlib only) for the simulator's fake images.

Rules:
- Output is a valid 8-bit RGB PNG: signature, IHDR, one IDAT, IEND, each chunk with its CRC.
- The picture is a function of (prompt, seed, index, width, height) only: a SHA-256 of those
  picks a palette and a number of horizontal bands, each band a left-to-right gradient between
  two palette colours. Same inputs give the same bytes; different inputs give different pictures.
- It must be cheap enough to serve from an event loop's thread pool: Python work is per band and
  per 8-pixel column segment, never per pixel. Every row after a band's first one is identical
  to the row above, so it is written with PNG filter 2 ("Up") as all zeros, which zlib level 1
  compresses at memory speed into a file of a few kilobytes.
"""

import hashlib
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_SEGMENT = 8  # pixels per gradient step: small enough to look smooth, large enough to be cheap
_FILTER_NONE = b"\x00"
_FILTER_UP = b"\x02"


def render_png(width: int, height: int, *, prompt: str, seed: int, index: int) -> bytes:
    """Render the deterministic picture for these inputs as PNG bytes."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    digest = hashlib.sha256(f"{width}x{height}\0{seed}\0{index}\0{prompt}".encode()).digest()
    palette = [tuple(digest[i : i + 3]) for i in range(0, 24, 3)]
    bands = min(height, 3 + digest[24] % 9)
    zero_row = _FILTER_UP + bytes(3 * width)

    parts: list[bytes] = []
    for band in range(bands):
        top, bottom = band * height // bands, (band + 1) * height // bands
        start, end = palette[band % 8], palette[(band + 1 + digest[25] % 7) % 8]
        parts.append(_FILTER_NONE + _gradient_row(width, start, end))
        parts.append(zero_row * (bottom - top - 1))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour RGB
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(b"".join(parts), 1)),
            _chunk(b"IEND", b""),
        )
    )


def png_size(data: bytes) -> tuple[int, int]:
    """Read (width, height) from a PNG's IHDR; raise ValueError if it is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _gradient_row(width: int, start: tuple[int, ...], end: tuple[int, ...]) -> bytes:
    segments = -(-width // _SEGMENT)
    steps = max(segments - 1, 1)
    row = b"".join(
        bytes(a + (b - a) * s // steps for a, b in zip(start, end, strict=True)) * _SEGMENT
        for s in range(segments)
    )
    return row[: 3 * width]


def _chunk(kind: bytes, data: bytes) -> bytes:
    # The CRC covers the type and the data; chaining crc32 avoids copying a large IDAT.
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
