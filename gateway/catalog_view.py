"""The public view of the model catalogue: ``GET /v1/models``."""

from typing import Any

from gateway.tasks.schemas import ModelCard, ModelList, encode_json
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


class ModelLists:
    """``GET /v1/models`` bodies, encoded once per set of allowed models.

    The catalogue is fixed for the life of the process, and a caller's allowed models
    come from its cached key, so the body depends on nothing else. Bounded: keys with
    many different lists cannot grow it without limit.
    """

    def __init__(self, catalog: Catalog, capacity: int = 1_000) -> None:
        self._catalog = catalog
        self._capacity = capacity
        self._bodies: dict[frozenset[str] | None, bytes] = {}

    def body(self, allowed: frozenset[str] | None) -> bytes:
        found = self._bodies.get(allowed)
        if found is None:
            if len(self._bodies) >= self._capacity:
                self._bodies.clear()
            found = self._bodies[allowed] = encode_json(model_list(self._catalog, allowed))
        return found
