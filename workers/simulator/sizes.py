"""Output pixel sizes, as the upstream itself defines them.

Rules:
- 1K and 2K are the size x quality table of the provider's documentation (eleven aspect ratios),
  plus ``2.35:1`` (1568x672 at 1K) which Krea 2 also accepts.
- 4K: the longer side is 4096 px (Krea 1's maximum); the shorter keeps the aspect ratio,
  rounded down to a multiple of 32.
- Anything not in the table is unsupported; the app answers 400 for it.

This is the simulator's own copy on purpose: a real upstream owns its table, and Tollgate's
catalogue must agree with it, not share it.
"""

from typing import Final

RESOLUTIONS: Final = ("1K", "2K", "4K")

_BASE: Final[dict[str, tuple[tuple[int, int], tuple[int, int]]]] = {
    # aspect ratio: (1K size, 2K size)
    "1:1": ((1024, 1024), (2048, 2048)),
    "4:3": ((1152, 896), (2304, 1728)),
    "3:4": ((896, 1152), (1728, 2304)),
    "5:4": ((1152, 896), (2240, 1792)),
    "4:5": ((896, 1152), (1792, 2240)),
    "2:3": ((832, 1280), (1664, 2496)),
    "3:2": ((1280, 832), (2496, 1664)),
    "9:16": ((768, 1344), (1472, 2688)),
    "16:9": ((1344, 768), (2688, 1472)),
    "1:2": ((704, 1472), (1408, 2816)),
    "2:1": ((1472, 704), (2816, 1408)),
    "2.35:1": ((1568, 672), (3136, 1344)),
}

ASPECT_RATIOS: Final = tuple(_BASE)


def _four_k(ratio: str) -> tuple[int, int]:
    wide, high = (float(part) for part in ratio.split(":"))
    if wide >= high:
        return 4096, int(4096 * high / wide) // 32 * 32
    return int(4096 * wide / high) // 32 * 32, 4096


SIZES: Final[dict[tuple[str, str], tuple[int, int]]] = {
    (ratio, resolution): size
    for ratio, (one_k, two_k) in _BASE.items()
    for resolution, size in (("1K", one_k), ("2K", two_k), ("4K", _four_k(ratio)))
}


def image_size(aspect_ratio: str, resolution: str) -> tuple[int, int] | None:
    """(width, height) for this aspect ratio and resolution, or None if unsupported."""
    return SIZES.get((aspect_ratio, resolution))
