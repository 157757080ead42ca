"""Validate a generation request against its model's catalogue entry.

Everything a model accepts, its ranges and defaults come from the catalogue;
there is no per-model code here. ``resolve_request`` turns the fields a client
sent into an ``ImageRequest`` with every default applied and the size turned
into pixels, or raises ``InvalidField`` naming the offending field.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pricing.catalog import COMMON_FIELDS, ModelEntry, ParamSpec

_WXH = re.compile(r"^([1-9][0-9]{1,4})x([1-9][0-9]{1,4})$")


class InvalidField(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """A validated request: what the upstream is asked for and what pricing counts."""

    model: str
    prompt: str
    size: str
    quality: str | None
    width: int
    height: int
    images: int
    steps: int | None
    params: Mapping[str, Any] = field(default_factory=dict)
    # The catalogue's `upstream_size`: how an upstream taking either form gets the size.
    upstream_size: str | None = None

    @property
    def has_style_references(self) -> bool:
        return bool(self.params.get("image_style_references"))

    @property
    def has_moodboard(self) -> bool:
        return bool(self.params.get("moodboards"))

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "size": self.size,
            "quality": self.quality,
            "width": self.width,
            "height": self.height,
            "images": self.images,
            "steps": self.steps,
            "params": dict(self.params),
            "upstream_size": self.upstream_size,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ImageRequest":
        return cls(
            model=data["model"],
            prompt=data["prompt"],
            size=data["size"],
            quality=data["quality"],
            width=data["width"],
            height=data["height"],
            images=data["images"],
            steps=data["steps"],
            params=dict(data["params"]),
            # Absent from requests stored before the field existed.
            upstream_size=data.get("upstream_size"),
        )


def _check_param(name: str, spec: ParamSpec, value: Any, model_id: str) -> Any:
    if spec.type == "bool":
        if not isinstance(value, bool):
            raise InvalidField(name, "must be true or false")
        return value
    if spec.type == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidField(name, "must be an integer")
        if spec.fixed is not None and value != spec.fixed:
            raise InvalidField(name, f"is fixed at {spec.fixed} for model {model_id}")
        if spec.min is not None and value < spec.min:
            raise InvalidField(name, f"must be at least {spec.min}")
        if spec.max is not None and value > spec.max:
            raise InvalidField(name, f"must be at most {spec.max}")
        return value
    if spec.type == "str":
        if not isinstance(value, str):
            raise InvalidField(name, "must be a string")
        if spec.max_length is not None and len(value) > spec.max_length:
            raise InvalidField(name, f"must be at most {spec.max_length} characters")
        return value
    if spec.type == "enum":
        assert spec.values is not None  # the catalogue guarantees it
        if value not in spec.values:
            raise InvalidField(name, f"must be one of {', '.join(spec.values)}")
        return value
    # list
    if not isinstance(value, list):
        raise InvalidField(name, "must be an array")
    if spec.max_items is not None and len(value) > spec.max_items:
        raise InvalidField(name, f"takes at most {spec.max_items} item(s)")
    return value


def _resolve_size(entry: ModelEntry, fields: Mapping[str, Any]) -> tuple[str, str | None, int, int]:
    size = fields.get("size")
    quality = fields.get("quality")
    if size is not None and not isinstance(size, str):
        raise InvalidField("size", "must be a string")
    if quality is not None and not isinstance(quality, str):
        raise InvalidField("quality", "must be a string")
    if entry.sizes is not None:
        size = size or entry.default_size
        quality = quality or entry.default_quality
        assert size is not None
        assert quality is not None
        if size not in entry.sizes:
            raise InvalidField(
                "size", f"must be one of {', '.join(entry.sizes)} for model {entry.id}"
            )
        if quality not in entry.sizes[size]:
            raise InvalidField(
                "quality", f"must be one of {', '.join(entry.qualities)} for model {entry.id}"
            )
        width, height = entry.sizes[size][quality]
        return size, quality, width, height
    bounds = entry.dimensions
    assert bounds is not None
    if quality is not None:
        raise InvalidField("quality", f"is not accepted by model {entry.id}; use size as WxH")
    size = size or bounds.default
    match = _WXH.match(size)
    if not match:
        raise InvalidField("size", f"must be WIDTHxHEIGHT in pixels for model {entry.id}")
    width, height = int(match[1]), int(match[2])
    for side in (width, height):
        if not bounds.min_side <= side <= bounds.max_side:
            raise InvalidField(
                "size", f"each side must be between {bounds.min_side} and {bounds.max_side}"
            )
        if side % bounds.multiple_of:
            raise InvalidField("size", f"each side must be a multiple of {bounds.multiple_of}")
    if width * height > bounds.max_pixels:
        raise InvalidField("size", f"must be at most {bounds.max_pixels} pixels")
    return size, None, width, height


def resolve_request(entry: ModelEntry, fields: Mapping[str, Any]) -> ImageRequest:
    """Validate the client's fields for this model and apply the catalogue's defaults."""
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidField("prompt", "is required and must be a non-empty string")
    if len(prompt) > entry.prompt_max_chars:
        raise InvalidField("prompt", f"must be at most {entry.prompt_max_chars} characters")
    for name in fields:
        if name not in COMMON_FIELDS and name not in entry.params:
            raise InvalidField(name, f"is not accepted by model {entry.id}")
    size, quality, width, height = _resolve_size(entry, fields)

    params: dict[str, Any] = {}
    for name, spec in entry.params.items():
        value = fields.get(name)
        if value is None:
            value = spec.fixed if spec.fixed is not None else spec.default
            if value is not None:
                params[name] = value
            continue
        params[name] = _check_param(name, spec, value, entry.id)

    images = params.get("n", entry.images_per_generation)
    steps = params.get("num_inference_steps")
    return ImageRequest(
        model=entry.id,
        prompt=prompt,
        size=size,
        quality=quality,
        width=width,
        height=height,
        images=images,
        steps=steps,
        params=params,
        upstream_size=entry.upstream_size,
    )
