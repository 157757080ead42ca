"""The public view of the model catalogue: ``GET /v1/models``."""

from typing import Any

from gateway.tasks.schemas import ModelCard, ModelList
from pricing.catalog import Catalog, ModelEntry, ParamSpec


def _setting(spec: ParamSpec) -> dict[str, Any]:
    shown = spec.model_dump(exclude_none=True, exclude_defaults=True)
    shown["type"] = spec.type
    if spec.values is not None:
        shown["values"] = list(spec.values)
    return shown


def model_card(entry: ModelEntry) -> ModelCard:
    card = ModelCard(
        id=entry.id,
        object="model",
        name=entry.name,
        description=entry.description,
        images_per_generation=entry.images_per_generation,
        max_images=entry.max_images(),
        estimated_seconds=entry.estimated_seconds,
        max_resolution=entry.max_resolution,
        billing_rule=entry.price.rule,
        prompt_max_chars=entry.prompt_max_chars,
        settings={name: _setting(spec) for name, spec in entry.params.items()},
    )
    if entry.sizes is not None:
        card.sizes = {
            size: {quality: f"{w}x{h}" for quality, (w, h) in by_quality.items()}
            for size, by_quality in entry.sizes.items()
        }
        card.default_size = entry.default_size
        card.qualities = list(entry.qualities)
        card.default_quality = entry.default_quality
    elif entry.dimensions is not None:
        bounds = entry.dimensions
        card.size_format = "WxH"
        card.default_size = bounds.default
        card.size_bounds = {
            "min_side": bounds.min_side,
            "max_side": bounds.max_side,
            "multiple_of": bounds.multiple_of,
            "max_pixels": bounds.max_pixels,
        }
    return card


def model_list(catalog: Catalog, allowed: frozenset[str] | None = None) -> ModelList:
    """The models a caller may use (``allowed`` None: all of them)."""
    entries = [e for e in catalog.models if allowed is None or e.id in allowed]
    return ModelList(object="list", data=[model_card(entry) for entry in entries])
