"""The public view of the model catalogue: ``GET /v1/models``."""

from typing import Any

from gateway.prices.book import Snapshot
from gateway.tasks.schemas import ModelCard, ModelList, ModelPrice, encode_json
from pricing.catalog import Catalog, ModelEntry, ParamSpec, Price


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


def model_price(price: Price, currency: str, group: str) -> ModelPrice:
    return ModelPrice(
        rule=price.rule,
        amount=price.amount,
        currency=currency,
        user_group=group,
        by_quality=dict(price.by_quality) or None,
        with_style_references=price.with_style_references,
        with_moodboard=price.with_moodboard,
    )


def model_list(
    catalog: Catalog,
    allowed: frozenset[str] | None = None,
    prices: Snapshot | None = None,
    group: str = "default",
) -> ModelList:
    """The models a caller may use (``allowed`` None: all of them), each with the price
    the caller's group pays when ``prices`` is given."""
    entries = [e for e in catalog.models if allowed is None or e.id in allowed]
    cards = []
    for entry in entries:
        card = model_card(entry)
        if prices is not None:
            shown_group, _ = prices.group(group)
            price, _ = prices.effective_price(shown_group, entry)
            card.price = model_price(price, catalog.credit_currency, shown_group)
            card.billing_rule = price.rule
        cards.append(card)
    return ModelList(object="list", data=cards)


class ModelLists:
    """``GET /v1/models`` bodies, encoded once per group and set of allowed models.

    A body depends on the prices in force (their version), the caller's group and its
    allowed models (both from its cached key): bodies are kept per (group, allowed) and
    all dropped when the prices' version moves. Bounded: keys with many different lists
    cannot grow it without limit.
    """

    def __init__(self, catalog: Catalog, capacity: int = 1_000) -> None:
        self._catalog = catalog
        self._capacity = capacity
        self._version = -1
        self._bodies: dict[tuple[str, frozenset[str] | None], bytes] = {}

    def body(self, prices: Snapshot, group: str, allowed: frozenset[str] | None) -> bytes:
        if prices.version != self._version:
            self._bodies.clear()
            self._version = prices.version
        key = (group, allowed)
        found = self._bodies.get(key)
        if found is None:
            if len(self._bodies) >= self._capacity:
                self._bodies.clear()
            listed = model_list(self._catalog, allowed, prices, group)
            found = self._bodies[key] = encode_json(listed)
        return found
