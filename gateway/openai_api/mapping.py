"""OpenAI's image request onto the catalogue: the one rule, in code (docs/openai.md).

``unified_fields(entry, body)`` turns the body of ``POST /openai/v1/images/generations``
into the fields of ``POST /v1/images/generations`` for that model, or raises
``InvalidRequest`` naming the OpenAI field. It is pure: the catalogue decides
everything, as it does for the other doors.

- ``size`` ``WxH`` for a model priced by named sizes (an aspect ratio and a
  quality tier, like Krea's): the aspect whose ratio is nearest in log scale
  (|ln(w/h) − ln(aw/ah)|, the first listed on a tie), then the quality tier of
  that aspect whose pixel count is nearest in log scale (the smaller on a tie).
  A model taking ``WxH`` gets it as sent. ``auto`` or no size: the model's default.
  An aspect name the model lists (``16:9``) is also accepted as it is.
- ``quality``: a tier the model lists (``2K``, ``high``) is used as it is; ``hd``
  is the model's highest tier; ``auto`` and ``standard`` keep the tier the size
  chose. A model without tiers takes only ``auto`` and ``standard``.
- ``n``: passed on to a model that takes ``n``; for a model that always makes
  the same number of images, ``n`` must be that number (or left out).
- ``style``, ``user``, ``safety_identifier``, ``moderation``: accepted and not
  used. ``background`` and ``output_format`` reach a model whose catalogue entry
  declares them; otherwise only ``background: auto`` is accepted.
  ``stream: true`` and ``partial_images`` are refused.
- Any other field the model's catalogue entry accepts (``seed``,
  ``negative_prompt``, ``callback_url``, …; ``extra_body`` in the SDK) is passed
  on by its own name; anything else is an unknown field.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.errors import InvalidRequest
from pricing.catalog import COMMON_FIELDS, ModelEntry

RESPONSE_FORMATS: Final = ("url", "b64_json")
STYLES: Final = ("vivid", "natural")
MODERATION: Final = ("auto", "low")
KEEP_QUALITY: Final = ("auto", "standard")
# OpenAI fields that are accepted and have no effect here.
IGNORED: Final = ("style", "user", "safety_identifier", "moderation")
# Fields read by this module rather than passed on.
OWN: Final = ("model", "prompt", "n", "size", "quality", "response_format", "stream")
MAX_USER_CHARS: Final = 256

_WXH = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


@dataclass(frozen=True, slots=True)
class Mapped:
    """The unified request fields, and how the answer is to be given."""

    fields: dict[str, Any]
    response_format: str


def _string(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(name, "must be a string")
    return value


def _choice(body: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str | None:
    value = _string(body, name)
    if value is not None and value not in allowed:
        raise InvalidRequest(name, f"must be one of {', '.join(allowed)}")
    return value


def nearest_named_size(entry: ModelEntry, width: int, height: int) -> tuple[str, str]:
    """The (aspect, quality) of a named-size model nearest to ``width``×``height``."""
    sizes = entry.sizes
    assert sizes is not None
    wanted_ratio = math.log(width / height)
    # Every tier of a size has its ratio; the first tier's stands for the size.
    best_size = min(
        sizes, key=lambda name: abs(wanted_ratio - _log_ratio(next(iter(sizes[name].values()))))
    )
    wanted_area = math.log(width * height)
    tiers = sizes[best_size]
    best_quality = min(
        tiers,
        key=lambda tier: (
            abs(wanted_area - math.log(tiers[tier][0] * tiers[tier][1])),
            tiers[tier][0] * tiers[tier][1],
        ),
    )
    return best_size, best_quality


def _log_ratio(pixels: tuple[int, int]) -> float:
    return math.log(pixels[0] / pixels[1])


def highest_quality(entry: ModelEntry, size: str) -> str:
    assert entry.sizes is not None
    tiers = entry.sizes[size]
    return max(tiers, key=lambda tier: tiers[tier][0] * tiers[tier][1])


def _map_size(entry: ModelEntry, size: str | None, quality: str | None) -> dict[str, Any]:
    if size == "auto":
        size = None
    if entry.sizes is None:
        if quality is not None and quality not in KEEP_QUALITY:
            raise InvalidRequest(
                "quality",
                f"model {entry.id} has no quality tiers; use auto or standard, or leave it out",
            )
        if size is not None and not _WXH.match(size):
            raise InvalidRequest("size", "must be WIDTHxHEIGHT in pixels (1024x1024) or auto")
        return {} if size is None else {"size": size}
    tiers = entry.qualities
    if quality is not None and quality not in (*KEEP_QUALITY, "hd", *tiers):
        allowed = ", ".join((*tiers, "hd", *KEEP_QUALITY))
        raise InvalidRequest("quality", f"must be one of {allowed} for model {entry.id}")
    chosen_size: str | None = None
    chosen_quality: str | None = None
    if size is not None:
        if size in entry.sizes:
            chosen_size = size
        elif match := _WXH.match(size):
            chosen_size, chosen_quality = nearest_named_size(entry, int(match[1]), int(match[2]))
        else:
            raise InvalidRequest(
                "size",
                f"must be WIDTHxHEIGHT in pixels (1024x1024), auto, or one of "
                f"{', '.join(entry.sizes)} for model {entry.id}",
            )
    if quality == "hd":
        chosen_quality = highest_quality(entry, chosen_size or entry.default_size or "")
    elif quality is not None and quality not in KEEP_QUALITY:
        chosen_quality = quality
    fields: dict[str, Any] = {}
    if chosen_size is not None:
        fields["size"] = chosen_size
    if chosen_quality is not None:
        fields["quality"] = chosen_quality
    return fields


def _map_n(entry: ModelEntry, n: Any) -> dict[str, Any]:
    if n is None:
        return {}
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidRequest("n", "must be an integer")
    if "n" in entry.params:
        return {"n": n}
    makes = entry.images_per_generation
    if n != makes:
        raise InvalidRequest(
            "n",
            f"model {entry.id} makes {makes} image{'s' if makes > 1 else ''} per generation; "
            f"send n={makes} or leave n out",
        )
    return {}


def unified_fields(entry: ModelEntry, body: Mapping[str, Any]) -> Mapped:
    """The unified request this OpenAI body stands for (``model`` and ``prompt`` included)."""
    response_format = _choice(body, "response_format", RESPONSE_FORMATS) or "url"
    _choice(body, "style", STYLES)
    _choice(body, "moderation", MODERATION)
    for name in ("user", "safety_identifier"):
        value = _string(body, name)
        if value is not None and len(value) > MAX_USER_CHARS:
            raise InvalidRequest(name, f"must be at most {MAX_USER_CHARS} characters")
    if body.get("stream") not in (None, False):
        raise InvalidRequest("stream", "streaming is not supported; leave it out or false")
    fields: dict[str, Any] = {"model": entry.id, "prompt": body.get("prompt")}
    fields.update(_map_size(entry, _string(body, "size"), _string(body, "quality")))
    fields.update(_map_n(entry, body.get("n")))
    for name, value in body.items():
        if name in OWN or name in IGNORED or value is None:
            continue
        if name in entry.params or name in COMMON_FIELDS:
            fields[name] = value
        elif name == "background" and value == "auto":
            continue
        elif name in ("background", "output_format", "output_compression"):
            raise InvalidRequest(name, f"is not supported by model {entry.id}")
        else:
            raise InvalidRequest(name, "unknown field")
    return Mapped(fields=fields, response_format=response_format)
