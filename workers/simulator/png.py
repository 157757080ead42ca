"""A tiny deterministic PNG encoder (stdlib only) for the simulator's fake images.

Rules:
- Output is a valid 8-bit RGB PNG: signature, IHDR, one IDAT, IEND, each chunk with its CRC.
- The picture is a function of (prompt, seed, index, width, height) only: a SHA-256 of those
  picks a palette and a number of horizontal bands, each band a left-to-right gradient between
  two palette colours. Same inputs give the same bytes; different inputs give different pictures.
- It must be cheap: Python work is per band and per 8-pixel column segment, never per pixel.
  Every row after a band's first one equals the row above, so it is written with PNG filter 2
  ("Up") as all zeros. Those runs of zero rows are deflated once per (width, rows) and cached;
  each piece of the zlib stream is sync-flushed by its own compressor, so pieces concatenate
  into one valid stream, and the stream's Adler-32 over the zero runs is computed in closed
  form. A 2048x2048 image then costs a few milliseconds, a 1024x1024 one about one.
"""

import functools
import hashlib
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_SEGMENT = 8  # pixels per gradient step: small enough to look smooth, large enough to be cheap
_FILTER_NONE = b"\x00"
_FILTER_UP = b"\x02"
_ADLER_MOD = 65521
_FINAL_BLOCK = zlib.compressobj(1, zlib.DEFLATED, -15).flush()  # an empty deflate block, final


def render_png(width: int, height: int, *, prompt: str, seed: int, index: int) -> bytes:
    """Render the deterministic picture for these inputs as PNG bytes."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    digest = hashlib.sha256(f"{width}x{height}\0{seed}\0{index}\0{prompt}".encode()).digest()
    palette = [tuple(digest[i : i + 3]) for i in range(0, 24, 3)]
    bands = min(height, 3 + digest[24] % 9)
    # zlib stream: header (deflate, 32K window, fastest), deflate pieces, Adler-32 of the raw data.
    pieces, adler = [b"\x78\x01"], 1
    for band in range(bands):
        top, bottom = band * height // bands, (band + 1) * height // bands
        start, end = palette[band % 8], palette[(band + 1 + digest[25] % 7) % 8]
        first_row = _FILTER_NONE + _gradient_row(width, start, end)
        pieces.append(_deflate_piece(first_row))
        adler = zlib.adler32(first_row, adler)
        if repeats := bottom - top - 1:
            pieces.append(_deflated_repeat_rows(width, repeats))
            adler = _adler32_repeat_rows(adler, width, repeats)
    pieces += [_FINAL_BLOCK, struct.pack(">I", adler)]

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour RGB
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", b"".join(pieces)),
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


def _deflate_piece(data: bytes) -> bytes:
    # Raw deflate from a fresh compressor never refers back before its own start, and a sync
    # flush ends it on a byte boundary without the final-block bit: safe to concatenate.
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


@functools.lru_cache(maxsize=512)
def _deflated_repeat_rows(width: int, rows: int) -> bytes:
    return _deflate_piece((_FILTER_UP + bytes(3 * width)) * rows)


def _adler32_repeat_rows(adler: int, width: int, rows: int) -> int:
    """Continue an Adler-32 over `rows` repeats of (filter byte 2, then 3*width zero bytes)."""
    # Per row the low sum `a` grows by 2 and the high sum `b` by (3*width + 1) * a, taking `a`
    # after the 2; summed over the rows that is rows*a0 + rows*(rows + 1) times (3*width + 1).
    low, high = adler & 0xFFFF, adler >> 16
    high = (high + (3 * width + 1) * (rows * low + rows * (rows + 1))) % _ADLER_MOD
    low = (low + 2 * rows) % _ADLER_MOD
    return (high << 16) | low


def _chunk(kind: bytes, data: bytes) -> bytes:
    # The CRC covers the type and the data; chaining crc32 avoids copying a large IDAT.
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
