"""Quotes: the seeds' figures to the micro-credit, groups, upstream cost, and monotonicity."""

import copy
import math
import tomllib
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing.catalog import (
    DEFAULT_CATALOG_PATH,
    Catalog,
    CatalogError,
    ModelEntry,
    parse_catalog,
)
from pricing.money import credits_from_micros
from pricing.quote import MEGAPIXEL, Quote, quote, settlement
from pricing.request import ImageRequest, resolve_request


def seed_priced(raw: dict[str, Any]) -> dict[str, Any]:
    """The shipped catalogue with each model sold at its seed figure, in credits: the
    prices a group gets when its price is set to the seed's figure (the arithmetic of the
    seeds' worked examples); the upstream cost is then the price."""
    raw = copy.deepcopy(raw)
    for entry in raw["models"]:
        cost = entry.pop("upstream_cost")
        entry["price"] = {k: v for k, v in cost.items() if k != "currency"}
    return raw


CATALOG = parse_catalog(seed_priced(tomllib.loads(DEFAULT_CATALOG_PATH.read_text("utf-8"))))
MODEL_IDS = sorted(entry.id for entry in CATALOG.models)
WXH_MODEL_IDS = sorted(entry.id for entry in CATALOG.models if entry.dimensions is not None)
VARIABLE_STEP_MODEL_IDS = sorted(
    entry.id
    for entry in CATALOG.models
    if "num_inference_steps" in entry.params and entry.params["num_inference_steps"].fixed is None
)
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


def shipped_raw() -> dict[str, Any]:
    return seed_priced(tomllib.loads(DEFAULT_CATALOG_PATH.read_text(encoding="utf-8")))


def model(model_id: str, catalog: Catalog = CATALOG) -> ModelEntry:
    entry = catalog.model(model_id)
    assert entry is not None, model_id
    return entry


def request_for(model_id: str, catalog: Catalog = CATALOG, **fields: Any) -> ImageRequest:
    fields.setdefault("prompt", "a cinematic glass cabin beside a frozen lake")
    return resolve_request(model(model_id, catalog), fields)


def priced(
    model_id: str,
    *,
    catalog: Catalog = CATALOG,
    group: str = "default",
    images: int | None = None,
    **fields: Any,
) -> Quote:
    request = request_for(model_id, catalog, **fields)
    return quote(model(model_id, catalog), group, catalog.groups[group], request, images=images)


def catalog_with_groups(groups: dict[str, Any]) -> Catalog:
    raw = shipped_raw()
    raw["groups"] = {"default": {"multiplier": "1"}, **groups}
    return parse_catalog(raw)


def catalog_with_upstream_cost(model_id: str, cost: dict[str, str]) -> Catalog:
    raw = copy.deepcopy(shipped_raw())
    next(m for m in raw["models"] if m["id"] == model_id)["upstream_cost"] = cost
    return parse_catalog(raw)


def exact_micros(entry: ModelEntry, request: ImageRequest, images: int) -> int:
    """An independent oracle: the list price in fractions, ceiling to the micro-credit."""
    price = entry.price
    unit = price.amount
    if request.has_moodboard and price.with_moodboard is not None:
        unit = price.with_moodboard
    elif request.has_style_references and price.with_style_references is not None:
        unit = price.with_style_references
    elif request.quality in price.by_quality:
        unit = price.by_quality[request.quality]
    amount = Fraction(str(unit))
    if price.rule == "per_image":
        amount *= images
    elif price.rule == "per_megapixel_step":
        assert request.steps is not None
        amount *= Fraction(request.width * request.height, 2**20) * request.steps * images
    return math.ceil(amount * 1_000_000)


# The seeds' worked examples.


def test_megapixel_step_worked_example_is_exact() -> None:
    # seeds/004: (1024 * 512) / (1024 * 1024) * 4 * 0.0032 = 0.0064
    q = priced("stable-diffusion-3-5-large-turbo", size="1024x512")
    assert q.billing_rule == "per_megapixel_step"
    assert q.amount_micros == 6400
    assert credits_from_micros(q.amount_micros) == Decimal("0.0064")
    assert q.units == {"images": 1, "pixels": 524_288, "steps": 4}


def test_megapixel_step_worked_example_with_steps_sent_explicitly_is_the_same() -> None:
    q = priced("stable-diffusion-3-5-large-turbo", size="1024x512", num_inference_steps=4)
    assert q.amount_micros == 6400


def test_megapixel_is_two_to_the_twentieth_pixels() -> None:
    assert MEGAPIXEL == 1024 * 1024
    # 1 MP * 20 steps * 0.0032 = 0.064
    assert priced("flux-1-dev", size="1024x1024", num_inference_steps=20).amount_micros == 64_000


def test_megapixel_step_scales_with_images() -> None:
    q = priced("stable-diffusion-3-5-large-turbo", size="1024x512", n=3)
    assert q.amount_micros == 3 * 6400
    assert q.units["images"] == 3


def test_per_image_worked_example_two_images_cost_twice() -> None:
    # seeds/004: ¥0.37 per image for black-forest-labs/FLUX.1-pro.
    q = priced("flux-1-pro", size="1024x512", num_inference_steps=4, n=2)
    assert q.billing_rule == "per_image"
    assert q.amount_micros == 740_000
    assert credits_from_micros(q.amount_micros) == Decimal("0.74")
    assert q.units == {"images": 2}


@pytest.mark.parametrize("size", ["256x256", "1024x512", "1440x1440", "512x1440"])
@pytest.mark.parametrize("steps", [1, 20, 50])
def test_per_image_price_is_independent_of_size_and_steps(size: str, steps: int) -> None:
    assert priced("flux-1-pro", size=size, num_inference_steps=steps).amount_micros == 370_000


@pytest.mark.parametrize(
    ("model_id", "plain", "style", "moodboard"),
    [("krea-2-medium", 30_000, 35_000, 40_000), ("krea-2-large", 60_000, 65_000, 70_000)],
)
def test_krea_2_prices_with_style_references_and_moodboard(
    model_id: str, plain: int, style: int, moodboard: int
) -> None:
    assert priced(model_id).amount_micros == plain
    assert priced(model_id, image_style_references=["s1", "s2"]).amount_micros == style
    assert priced(model_id, moodboards=["m1"]).amount_micros == moodboard


@pytest.mark.parametrize(
    ("model_id", "moodboard"), [("krea-2-medium", 40_000), ("krea-2-large", 70_000)]
)
def test_krea_2_moodboard_with_style_references_costs_the_moodboard_price_not_the_sum(
    model_id: str, moodboard: int
) -> None:
    q = priced(model_id, image_style_references=["s1"], moodboards=["m1"])
    assert q.amount_micros == moodboard
    assert "with moodboard" in q.breakdown[0]


def test_krea_2_price_ignores_size_and_other_settings() -> None:
    plain = priced("krea-2-medium").amount_micros
    assert priced("krea-2-medium", size="2.35:1", creativity="high", seed=9).amount_micros == plain
    assert priced("krea-2-medium", styles=["lora"], intensity=100).amount_micros == plain


def test_krea_2_turbo_2k_is_priced_apart_from_1k() -> None:
    one_k = priced("krea-2-turbo", quality="1K")
    two_k = priced("krea-2-turbo", quality="2K")
    assert one_k.amount_micros == 2_000_000
    assert two_k.amount_micros == 4_000_000
    assert "quality 2K" in two_k.breakdown[0]


@pytest.mark.parametrize("size", sorted(model("krea-2-turbo").sizes or {}))
def test_krea_2_turbo_price_depends_on_quality_not_aspect_ratio(size: str) -> None:
    assert priced("krea-2-turbo", size=size, quality="1K").amount_micros == 2_000_000
    assert priced("krea-2-turbo", size=size, quality="2K").amount_micros == 4_000_000


@pytest.mark.parametrize("images", [1, 2, 3, 4, None])
@pytest.mark.parametrize("quality", ["1K", "2K", "4K"])
def test_krea_1_costs_8_credits_per_call_whatever_the_images(
    images: int | None, quality: str
) -> None:
    q = priced("krea-1", quality=quality, images=images)
    assert q.billing_rule == "per_call"
    assert q.amount_micros == 8_000_000
    assert q.units == {"calls": 1}


def test_krea_1_style_references_do_not_change_its_price() -> None:
    assert priced("krea-1", image_style_references=["s1", "s2"]).amount_micros == 8_000_000


# The one rounding.


def test_fractional_micros_are_rounded_up_once() -> None:
    # 288x288 = 81/1024 MP; * 1 step * 0.0032 = 253.125 micro-credits → 254.
    q = priced("flux-1-dev", size="288x288", num_inference_steps=1)
    assert q.amount_micros == 254
    assert q.cost_micros == 254


def test_group_multiplier_applies_before_the_single_rounding() -> None:
    # 253.125 * 1.5 = 379.6875 → 380; rounding first would give 254 * 1.5 = 381.
    catalog = catalog_with_groups({"gold": {"multiplier": "1.5"}})
    q = priced("flux-1-dev", catalog=catalog, group="gold", size="288x288", num_inference_steps=1)
    assert q.amount_micros == 380


def test_a_tiny_multiplier_excess_still_rounds_up() -> None:
    catalog = catalog_with_groups({"odd": {"multiplier": "1.0000001"}})
    # 0.030 * 1.0000001 = 0.0300000030 credits = 30000.003 micros → 30001.
    assert priced("krea-2-medium", catalog=catalog, group="odd").amount_micros == 30_001


def test_quote_keeps_every_digit_of_the_group_multiplier_before_rounding_up() -> None:
    catalog = catalog_with_groups({"odd": {"multiplier": "1.000000000000000000000000000001"}})
    # 8.000000000000000000000000000008 credits: the ceiling is 8000001 micro-credits.
    assert priced("krea-1", catalog=catalog, group="odd").amount_micros == 8_000_001


# Fewer images than asked for.


def test_fewer_images_cost_less_per_image() -> None:
    full = priced("flux-1-pro", n=3)
    one = priced("flux-1-pro", n=3, images=1)
    assert full.amount_micros == 1_110_000
    assert one.amount_micros == 370_000
    assert one.cost_micros == 370_000
    assert one.units == {"images": 1}


def test_fewer_images_cost_less_per_megapixel_step() -> None:
    full = priced("flux-1-dev", n=3, size="1024x1024", num_inference_steps=20)
    one = priced("flux-1-dev", n=3, size="1024x1024", num_inference_steps=20, images=1)
    assert full.amount_micros == 192_000
    assert one.amount_micros == 64_000


def test_fewer_images_cost_the_same_per_call() -> None:
    assert priced("krea-2-turbo", images=1).amount_micros == priced("krea-2-turbo").amount_micros
    assert priced("krea-1", images=2).amount_micros == 8_000_000


def test_no_images_cost_nothing_per_image() -> None:
    assert priced("flux-1-pro", n=2, images=0).amount_micros == 0


# Groups.


def test_group_multiplier_scales_the_charge_not_the_upstream_cost() -> None:
    catalog = catalog_with_groups({"gold": {"multiplier": "1.5"}})
    q = priced("stable-diffusion-3-5-large-turbo", catalog=catalog, group="gold", size="1024x512")
    assert q.amount_micros == 9600
    assert q.cost_micros == 6400
    assert any("group gold: × 1.5" in line for line in q.breakdown)


def test_group_multiplier_below_one_discounts() -> None:
    catalog = catalog_with_groups({"reseller": {"multiplier": "0.8"}})
    assert priced("krea-1", catalog=catalog, group="reseller").amount_micros == 6_400_000


def test_group_own_price_replaces_list_price_and_multiplier() -> None:
    catalog = catalog_with_groups(
        {
            "partner": {
                "multiplier": "2",
                "prices": {"flux-1-pro": {"rule": "per_image", "amount": "0.30"}},
            }
        }
    )
    own = priced("flux-1-pro", catalog=catalog, group="partner", n=2)
    assert own.amount_micros == 600_000
    assert own.cost_micros == 740_000
    assert any("its own price for flux-1-pro" in line for line in own.breakdown)
    # Models without an own price keep the group's multiplier.
    assert priced("krea-1", catalog=catalog, group="partner").amount_micros == 16_000_000


def test_group_own_price_may_use_another_rule() -> None:
    catalog = catalog_with_groups(
        {"flat": {"prices": {"flux-1-dev": {"rule": "per_call", "amount": "0.05"}}}}
    )
    q = priced("flux-1-dev", catalog=catalog, group="flat", n=4, num_inference_steps=50)
    assert q.billing_rule == "per_call"
    assert q.amount_micros == 50_000
    assert q.cost_micros == 4 * 50 * 3200  # 4 images * 50 steps * 1 MP * 0.0032


def test_group_own_price_keeps_its_surcharges() -> None:
    own = {"rule": "per_call", "amount": "0.02", "with_moodboard": "0.025"}
    catalog = catalog_with_groups({"vip": {"prices": {"krea-2-medium": own}}})
    assert priced("krea-2-medium", catalog=catalog, group="vip").amount_micros == 20_000
    assert (
        priced("krea-2-medium", catalog=catalog, group="vip", moodboards=["m"]).amount_micros
        == 25_000
    )


def test_default_group_changes_nothing() -> None:
    q = priced("flux-1-pro", n=2)
    assert q.amount_micros == q.cost_micros == 740_000
    assert not any(line.startswith("group ") for line in q.breakdown)


# Upstream cost.


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_upstream_cost_defaults_to_the_price(model_id: str) -> None:
    q = priced(model_id)
    assert q.cost_micros == q.amount_micros
    assert q.amount_micros > 0


def test_upstream_cost_can_differ_from_the_price() -> None:
    catalog = catalog_with_upstream_cost("flux-1-pro", {"rule": "per_image", "amount": "0.25"})
    q = priced("flux-1-pro", catalog=catalog, n=2)
    assert q.amount_micros == 740_000
    assert q.cost_micros == 500_000


def test_upstream_cost_may_use_another_rule_and_counts_delivered_images() -> None:
    catalog = catalog_with_upstream_cost("flux-1-pro", {"rule": "per_call", "amount": "0.5"})
    assert priced("flux-1-pro", catalog=catalog, n=3).cost_micros == 500_000
    catalog = catalog_with_upstream_cost("krea-1", {"rule": "per_image", "amount": "1.5"})
    assert priced("krea-1", catalog=catalog, images=2).cost_micros == 3_000_000
    assert priced("krea-1", catalog=catalog, images=2).amount_micros == 8_000_000


def test_upstream_cost_keeps_its_own_surcharges() -> None:
    cost = {"rule": "per_call", "amount": "0.02", "with_style_references": "0.022"}
    catalog = catalog_with_upstream_cost("krea-2-medium", cost)
    q = priced("krea-2-medium", catalog=catalog, image_style_references=["s"])
    assert q.amount_micros == 35_000
    assert q.cost_micros == 22_000


# Breakdown and JSON.


def test_breakdown_names_the_rule_the_arithmetic_and_the_final_micros() -> None:
    q = priced("stable-diffusion-3-5-large-turbo", size="1024x512")
    first, last = q.breakdown[0], q.breakdown[-1]
    assert first.startswith("stable-diffusion-3-5-large-turbo: per_megapixel_step: ")
    assert "1024×512" in first
    assert "4 step(s)" in first
    assert "0.0032 per MP-step (list price)" in first
    assert last == "rounded up to the micro-credit: 6400 micro-credits"


@pytest.mark.parametrize(
    ("model_id", "fields", "rule", "micros"),
    [
        ("krea-1", {}, "per_call", 8_000_000),
        ("flux-1-pro", {"n": 2}, "per_image", 740_000),
        ("flux-1-dev", {"size": "288x288", "num_inference_steps": 1}, "per_megapixel_step", 254),
    ],
)
def test_breakdown_mentions_each_rule_and_its_final_amount(
    model_id: str, fields: dict[str, Any], rule: str, micros: int
) -> None:
    q = priced(model_id, **fields)
    assert f": {rule}: " in q.breakdown[0]
    assert q.breakdown[-1].endswith(f" {micros} micro-credits")


def test_quote_json_is_plain_data() -> None:
    q = priced("flux-1-pro", n=2)
    assert q.to_json() == {
        "billing_rule": "per_image",
        "amount_micros": 740_000,
        "cost_micros": 740_000,
        "units": {"images": 2},
        "breakdown": list(q.breakdown),
        "images": 2,
        "exact_amount": "0.74",
        "exact_cost": "0.74",
        "cost_currency": None,
        "exact_cost_native": "0.74",
        "rates": {},
    }


@pytest.mark.parametrize(
    ("model_id", "fields", "delivered", "charge"),
    [
        ("flux-1-pro", {"n": 3}, 2, 740_000),  # per image: two of three images
        ("flux-1-pro", {"n": 3}, 3, 1_110_000),
        ("flux-1-pro", {"n": 3}, 5, 1_110_000),  # never more than reserved
        ("krea-1", {}, 1, 8_000_000),  # per call: the same whatever came back
        (
            "stable-diffusion-3-5-large-turbo",
            {"size": "1024x512", "n": 2},
            1,
            6_400,
        ),
    ],
)
def test_settlement_scales_image_counting_rules_by_delivered_images(
    model_id: str, fields: dict[str, Any], delivered: int, charge: int
) -> None:
    q = priced(model_id, **fields).to_json()
    assert settlement(q, delivered)[0] == charge


# A paid model is never free.


def test_per_megapixel_step_request_without_steps_is_never_free() -> None:
    raw = copy.deepcopy(shipped_raw())
    flux_dev = next(m for m in raw["models"] if m["id"] == "flux-1-dev")
    flux_dev["params"]["num_inference_steps"] = {"type": "int", "min": 1, "max": 50}
    # Refused when loaded, so such a model can never be quoted without steps.
    with pytest.raises(CatalogError, match=r"flux-1-dev.*num_inference_steps"):
        parse_catalog(raw)


# Properties over the shipped catalogue.


@st.composite
def wxh_size(draw: st.DrawFn, entry: ModelEntry) -> tuple[int, int]:
    bounds = entry.dimensions
    assert bounds is not None
    step = bounds.multiple_of
    low, high = -(-bounds.min_side // step), bounds.max_side // step
    width = draw(st.integers(low, high)) * step
    height = draw(st.integers(low, min(high, bounds.max_pixels // (width * step)))) * step
    return width, height


@st.composite
def valid_fields(draw: st.DrawFn, entry: ModelEntry) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": "p"}
    if entry.sizes is not None:
        fields["size"] = draw(st.sampled_from(sorted(entry.sizes)))
        fields["quality"] = draw(st.sampled_from(entry.qualities))
    else:
        width, height = draw(wxh_size(entry))
        fields["size"] = f"{width}x{height}"
    for name, spec in entry.params.items():
        if spec.fixed is not None:
            if draw(st.booleans()):
                fields[name] = spec.fixed
        elif spec.type == "int" and spec.min is not None and spec.max is not None:
            fields[name] = draw(st.none() | st.integers(spec.min, spec.max))
        elif spec.type == "list" and spec.max_items is not None:
            fields[name] = draw(st.none() | st.lists(st.just("ref"), max_size=spec.max_items))
        elif spec.type == "enum" and spec.values:
            fields[name] = draw(st.none() | st.sampled_from(spec.values))
    return fields


@st.composite
def shipped_requests(
    draw: st.DrawFn, model_ids: list[str] = MODEL_IDS
) -> tuple[ModelEntry, ImageRequest]:
    entry = model(draw(st.sampled_from(model_ids)))
    return entry, resolve_request(entry, draw(valid_fields(entry)))


def default_quote(entry: ModelEntry, request: ImageRequest, images: int | None = None) -> Quote:
    return quote(entry, "default", CATALOG.groups["default"], request, images=images)


@PROPERTY_SETTINGS
@given(shipped_requests())
def test_every_valid_request_quotes_a_non_negative_exact_ceiling(
    drawn: tuple[ModelEntry, ImageRequest],
) -> None:
    entry, request = drawn
    q = default_quote(entry, request)
    assert q.amount_micros >= 0
    assert q.cost_micros >= 0
    assert q.amount_micros == exact_micros(entry, request, request.images)
    assert q.billing_rule == entry.price.rule


@PROPERTY_SETTINGS
@given(shipped_requests())
def test_quote_is_non_decreasing_in_images(drawn: tuple[ModelEntry, ImageRequest]) -> None:
    entry, request = drawn
    amounts = [default_quote(entry, request, images=k).amount_micros for k in range(0, 5)]
    costs = [default_quote(entry, request, images=k).cost_micros for k in range(0, 5)]
    assert amounts == sorted(amounts)
    assert costs == sorted(costs)
    assert min(amounts) >= 0
    assert default_quote(entry, request, images=request.images) == default_quote(entry, request)


@PROPERTY_SETTINGS
@given(shipped_requests(VARIABLE_STEP_MODEL_IDS), st.data())
def test_quote_is_non_decreasing_in_steps(
    drawn: tuple[ModelEntry, ImageRequest], data: st.DataObject
) -> None:
    entry, request = drawn
    spec = entry.params["num_inference_steps"]
    assert request.steps is not None
    assert spec.max is not None
    more = data.draw(st.integers(request.steps, spec.max), label="more steps")
    fields: dict[str, Any] = {
        "prompt": request.prompt,
        "size": request.size,
        "quality": request.quality,
    }
    fields.update(request.params)
    fields["num_inference_steps"] = more
    bigger = resolve_request(entry, fields)
    assert bigger.steps == more
    assert default_quote(entry, bigger).amount_micros >= default_quote(entry, request).amount_micros


@PROPERTY_SETTINGS
@given(shipped_requests(WXH_MODEL_IDS), st.data())
def test_quote_is_non_decreasing_in_pixels(
    drawn: tuple[ModelEntry, ImageRequest], data: st.DataObject
) -> None:
    entry, request = drawn
    bounds = entry.dimensions
    assert bounds is not None
    step = bounds.multiple_of
    width = data.draw(st.integers(request.width // step, bounds.max_side // step)) * step
    tallest = min(bounds.max_side, bounds.max_pixels // width)
    if tallest < request.height:
        width, tallest = request.width, request.height
    height = data.draw(st.integers(request.height // step, tallest // step)) * step
    fields: dict[str, Any] = {"prompt": request.prompt, "size": f"{width}x{height}"}
    fields.update(request.params)
    bigger = resolve_request(entry, fields)
    assert bigger.width * bigger.height >= request.width * request.height
    assert default_quote(entry, bigger).amount_micros >= default_quote(entry, request).amount_micros
