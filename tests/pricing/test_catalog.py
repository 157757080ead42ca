"""The model catalogue: the shipped file against the seeds, and the loader's refusals."""

import copy
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pricing.catalog import (
    DEFAULT_CATALOG_PATH,
    Catalog,
    CatalogError,
    ModelEntry,
    Price,
    derive_price,
    load_catalog,
    parse_catalog,
)

SHIPPED_IDS = {
    "krea-2-turbo",
    "krea-2-medium",
    "krea-2-large",
    "krea-1",
    "flux-1-schnell",
    "flux-1-dev",
    "flux-1-pro",
    "stable-diffusion-3-5-large",
    "stable-diffusion-3-5-large-turbo",
    "stable-diffusion-xl-base-1.0",
    "chatgpt-image",
    "flux-1-1-pro",
    "flux-1-1-pro-ultra",
}

# seeds/004 names the SiliconFlow upstream ids; seeds/001 the Krea 2 endpoints.
UPSTREAM_IDS = {
    "flux-1-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-1-dev": "black-forest-labs/FLUX.1-dev",
    "flux-1-pro": "black-forest-labs/FLUX.1-pro",
    "stable-diffusion-3-5-large": "stabilityai/stable-diffusion-3-5-large",
    "stable-diffusion-3-5-large-turbo": "stabilityai/stable-diffusion-3-5-large-turbo",
    "stable-diffusion-xl-base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "krea-2-medium": "krea/krea-2/medium",
    "krea-2-large": "krea/krea-2/large",
    # The brief's upstream ids: OpenAI's model, Black Forest Labs' endpoint names.
    "chatgpt-image": "gpt-image-1",
    "flux-1-1-pro": "flux-pro-1.1",
    "flux-1-1-pro-ultra": "flux-pro-1.1-ultra",
}

# seeds/002: krea-2-turbo output pixels, size by quality, copied from the seed's table.
KREA_2_TURBO_PIXELS = {
    "1:1": {"1K": (1024, 1024), "2K": (2048, 2048)},
    "4:3": {"1K": (1152, 896), "2K": (2304, 1728)},
    "3:4": {"1K": (896, 1152), "2K": (1728, 2304)},
    "5:4": {"1K": (1152, 896), "2K": (2240, 1792)},
    "4:5": {"1K": (896, 1152), "2K": (1792, 2240)},
    "2:3": {"1K": (832, 1280), "2K": (1664, 2496)},
    "3:2": {"1K": (1280, 832), "2K": (2496, 1664)},
    "9:16": {"1K": (768, 1344), "2K": (1472, 2688)},
    "16:9": {"1K": (1344, 768), "2K": (2688, 1472)},
    "1:2": {"1K": (704, 1472), "2K": (1408, 2816)},
    "2:1": {"1K": (1472, 704), "2K": (2816, 1408)},
}

# seeds/001: the aspect ratios Krea 2 Medium and Large accept.
KREA_2_ASPECT_RATIOS = {"1:1", "4:3", "3:2", "16:9", "2.35:1", "4:5", "2:3", "9:16"}


def shipped_raw() -> dict[str, Any]:
    return tomllib.loads(DEFAULT_CATALOG_PATH.read_text(encoding="utf-8"))


def shipped_model(model_id: str) -> ModelEntry:
    entry = load_catalog().model(model_id)
    assert entry is not None, model_id
    return entry


def named_size_model(model_id: str = "test-named", **changes: Any) -> dict[str, Any]:
    model: dict[str, Any] = {
        "id": model_id,
        "name": "Test named",
        "provider": "test",
        "upstream_model": "test/named",
        "images_per_generation": 1,
        "estimated_seconds": 1,
        "max_resolution": "1K",
        "prompt_max_chars": 100,
        "default_size": "1:1",
        "default_quality": "1K",
        "sizes": {"1:1": {"1K": [1024, 1024]}, "16:9": {"1K": [1344, 768]}},
        "price": {"rule": "per_call", "amount": "1"},
    }
    model.update(changes)
    return model


def wxh_model(model_id: str = "test-wxh", **changes: Any) -> dict[str, Any]:
    model: dict[str, Any] = {
        "id": model_id,
        "name": "Test WxH",
        "provider": "test",
        "upstream_model": "test/wxh",
        "images_per_generation": 1,
        "estimated_seconds": 1,
        "max_resolution": "2048",
        "prompt_max_chars": 100,
        "dimensions": {"min_side": 256, "max_side": 2048, "max_pixels": 4_194_304},
        "params": {"num_inference_steps": {"type": "int", "min": 1, "max": 50, "default": 20}},
        "price": {"rule": "per_megapixel_step", "amount": "0.0032"},
    }
    model.update(changes)
    return model


def catalog_of(*models: dict[str, Any], groups: dict[str, Any] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {"models": list(models)}
    if groups is not None:
        raw["groups"] = groups
    return raw


def refusal(raw: dict[str, Any]) -> str:
    with pytest.raises(CatalogError) as caught:
        parse_catalog(raw)
    return str(caught.value)


VALID_TOML = """
[groups.default]
multiplier = "1"

[[models]]
id = "toml-model"
name = "TOML model"
provider = "test"
upstream_model = "test/toml"
images_per_generation = 2
estimated_seconds = 3
max_resolution = "1024"
prompt_max_chars = 100
dimensions = { min_side = 256, max_side = 1024, multiple_of = 32, max_pixels = 1048576 }
price = { rule = "per_image", amount = "0.25" }
"""


# The shipped catalogue, against the seeds.


def test_shipped_catalogue_has_exactly_the_sold_models() -> None:
    catalog = load_catalog()
    assert {entry.id for entry in catalog.models} == SHIPPED_IDS
    assert len(catalog.models) == len(SHIPPED_IDS)


def test_shipped_catalogue_loads_the_same_from_a_path_or_by_default() -> None:
    assert load_catalog(DEFAULT_CATALOG_PATH) == load_catalog()
    assert load_catalog(str(DEFAULT_CATALOG_PATH)) == load_catalog()


def test_shipped_catalogue_has_a_neutral_default_group() -> None:
    default = load_catalog().groups["default"]
    assert default.multiplier == 1
    assert default.prices == {}


@pytest.mark.parametrize(("model_id", "upstream"), sorted(UPSTREAM_IDS.items()))
def test_shipped_models_keep_the_seeds_upstream_ids(model_id: str, upstream: str) -> None:
    assert shipped_model(model_id).upstream_model == upstream


PROVIDERS = {
    "krea-2-turbo": "krea",
    "krea-2-medium": "krea",
    "krea-2-large": "krea",
    "krea-1": "krea",
    "chatgpt-image": "openai",
    "flux-1-1-pro": "bfl",
    "flux-1-1-pro-ultra": "bfl",
}


def test_every_model_is_served_by_its_upstream() -> None:
    for entry in load_catalog().models:
        assert entry.provider == PROVIDERS.get(entry.id, "siliconflow"), entry.id


def test_chatgpt_image_is_the_seeds_model_at_openai_sizes() -> None:
    entry = shipped_model("chatgpt-image")
    assert entry.sizes == {
        "1:1": {q: (1024, 1024) for q in ("low", "medium", "high")},
        "3:2": {q: (1536, 1024) for q in ("low", "medium", "high")},
        "2:3": {q: (1024, 1536) for q in ("low", "medium", "high")},
    }
    assert entry.qualities == ("low", "medium", "high")
    # seeds/000: two images, 183 compute units and about 60 s per generation.
    assert (entry.images_per_generation, entry.max_images()) == (2, 2)
    assert entry.estimated_seconds == 60
    assert entry.upstream_cost is not None
    assert (entry.upstream_cost.rule, entry.upstream_cost.amount) == ("per_call", Decimal(183))
    assert entry.upstream_cost.currency == "KCU"


@pytest.mark.parametrize(
    ("model_id", "units", "seconds", "form"),
    [("flux-1-1-pro", 114, 10, "pixels"), ("flux-1-1-pro-ultra", 171, 30, "aspect_ratio")],
)
def test_bfl_models_make_one_image_at_half_a_krea_generation(
    model_id: str, units: int, seconds: int, form: str
) -> None:
    entry = shipped_model(model_id)
    assert (entry.images_per_generation, entry.max_images()) == (1, 1)
    assert "one image per request" in entry.description
    assert entry.estimated_seconds == seconds
    # seeds/000's compute units buy two images; one Black Forest Labs request makes one.
    assert entry.upstream_cost is not None
    cost = entry.upstream_cost
    assert (cost.rule, cost.amount, cost.currency) == ("per_image", Decimal(units) / 2, "KCU")
    assert entry.upstream_size == form


def test_flux_1_1_pro_ultra_goes_up_to_2048() -> None:
    entry = shipped_model("flux-1-1-pro-ultra")
    assert entry.sizes is not None
    assert max(max(pixels) for q in entry.sizes.values() for pixels in q.values()) == 2048
    assert entry.sizes["1:1"]["2K"] == (2048, 2048)


def test_only_bfl_models_say_how_the_size_goes_upstream() -> None:
    for entry in load_catalog().models:
        assert (entry.upstream_size is not None) == (entry.provider == "bfl"), entry.id


def test_krea_2_turbo_size_quality_table_equals_the_seed_cell_by_cell() -> None:
    entry = shipped_model("krea-2-turbo")
    assert entry.sizes is not None
    assert set(entry.sizes) == set(KREA_2_TURBO_PIXELS)
    for size, by_quality in KREA_2_TURBO_PIXELS.items():
        assert set(entry.sizes[size]) == set(by_quality), size
        for quality, pixels in by_quality.items():
            assert tuple(entry.sizes[size][quality]) == pixels, (size, quality)


def test_krea_2_turbo_defaults_are_the_seeds_square_1k() -> None:
    entry = shipped_model("krea-2-turbo")
    assert entry.default_size == "1:1"
    assert entry.default_quality == "1K"
    assert entry.qualities == ("1K", "2K")
    assert entry.dimensions is None


def test_krea_2_turbo_seed_range_is_the_seeds() -> None:
    seed = shipped_model("krea-2-turbo").params["seed"]
    assert (seed.min, seed.max) == (0, 1_048_576)


@pytest.mark.parametrize("model_id", ["krea-2-medium", "krea-2-large"])
def test_krea_2_medium_and_large_offer_the_seeds_aspect_ratios_at_1k(model_id: str) -> None:
    entry = shipped_model(model_id)
    assert entry.sizes is not None
    assert set(entry.sizes) == KREA_2_ASPECT_RATIOS
    assert entry.qualities == ("1K",)
    assert entry.params["moodboards"].max_items == 1
    assert entry.params["creativity"].values == ("raw", "low", "medium", "high")
    assert entry.params["creativity"].default == "medium"


@pytest.mark.parametrize("model_id", ["krea-1", "krea-2-turbo"])
def test_krea_1_and_krea_2_turbo_make_four_images_per_generation(model_id: str) -> None:
    entry = shipped_model(model_id)
    assert entry.images_per_generation == 4
    assert entry.max_images() == 4


@pytest.mark.parametrize("model_id", ["flux-1-schnell", "stable-diffusion-3-5-large-turbo"])
def test_turbo_models_have_steps_fixed_at_four(model_id: str) -> None:
    steps = shipped_model(model_id).params["num_inference_steps"]
    assert steps.fixed == 4


def test_siliconflow_models_batch_at_most_four_images() -> None:
    for entry in load_catalog().models:
        if entry.provider != "siliconflow":
            continue
        assert entry.images_per_generation == 1, entry.id
        assert entry.max_images() == 4, entry.id


@pytest.mark.parametrize(
    ("model_id", "rule", "amount", "currency", "sale"),
    [
        ("krea-1", "per_call", "8", "KCU", "0.024"),
        ("krea-2-turbo", "per_call", "2", "KCU", "0.006"),
        ("krea-2-medium", "per_call", "0.030", "USD", "0.045"),
        ("krea-2-large", "per_call", "0.060", "USD", "0.09"),
        ("flux-1-pro", "per_image", "0.37", "CNY", "0.0777"),
        ("stable-diffusion-3-5-large-turbo", "per_megapixel_step", "0.0032", "CNY", "0.000672"),
        ("chatgpt-image", "per_call", "183", "KCU", "0.549"),
    ],
)
def test_shipped_upstream_costs_are_the_seeds_figures_in_their_own_currency(
    model_id: str, rule: str, amount: str, currency: str, sale: str
) -> None:
    entry = shipped_model(model_id)
    cost = entry.upstream_cost
    assert cost is not None
    assert (cost.rule, cost.amount, cost.currency) == (rule, Decimal(amount), currency)
    # The default sale price, in credits (USD): cost × rate × markup 1.5, rounded up.
    assert (entry.price.rule, entry.price.amount) == (rule, Decimal(sale))


def test_shipped_sale_prices_follow_the_documented_rule() -> None:
    catalog = load_catalog()
    assert catalog.credit_currency == "USD"
    assert catalog.default_markup == Decimal("1.5")
    assert catalog.exchange_rates == {
        "USD": Decimal(1),
        "CNY": Decimal("0.14"),
        "KCU": Decimal("0.002"),
    }
    for entry in catalog.models:
        cost = entry.upstream_cost
        assert cost is not None, entry.id
        assert cost.currency is not None, entry.id
        rate = catalog.default_rates()[cost.currency]
        expected = derive_price(cost.model_dump(mode="json"), rate, catalog.default_markup)
        assert entry.price.model_dump(mode="json") == Price.model_validate(expected).model_dump(
            mode="json"
        ), entry.id
        # Every modifier is priced too, in the same rule.
        assert set(entry.price.by_quality) == set(cost.by_quality), entry.id
        assert (entry.price.with_moodboard is None) == (cost.with_moodboard is None), entry.id


def test_a_given_price_is_kept_and_a_currency_without_a_rate_is_refused() -> None:
    model = wxh_model("priced")
    model["upstream_cost"] = {"currency": "EUR", "rule": "per_image", "amount": "1"}
    message = refusal(catalog_of(model))
    assert "upstream currency 'EUR' has no rate" in message
    del model["price"]
    message = refusal(catalog_of(model))
    assert "no rate in `exchange_rates` for its upstream currency 'EUR'" in message


def test_every_per_megapixel_step_model_prices_steps_it_always_has() -> None:
    for entry in load_catalog().models:
        if entry.price.rule != "per_megapixel_step":
            continue
        steps = entry.params["num_inference_steps"]
        assert steps.fixed is not None or steps.default is not None, entry.id


def test_catalog_model_lookup_returns_none_for_an_unknown_id() -> None:
    catalog = load_catalog()
    assert catalog.model("no-such-model") is None
    krea_1 = catalog.model("krea-1")
    assert krea_1 is not None
    assert krea_1.name == "Krea 1"


# Malformed catalogues, given as data.


def test_minimal_catalogue_gets_a_default_group() -> None:
    catalog = parse_catalog(catalog_of(named_size_model(), wxh_model()))
    assert isinstance(catalog, Catalog)
    assert set(catalog.groups) == {"default"}
    assert catalog.groups["default"].multiplier == 1


def test_upstream_size_aspect_ratio_is_accepted_for_named_ratio_sizes() -> None:
    catalog = parse_catalog(catalog_of(named_size_model(upstream_size="aspect_ratio")))
    assert catalog.models[0].upstream_size == "aspect_ratio"
    assert parse_catalog(catalog_of(wxh_model(upstream_size="pixels"))).models[0].upstream_size


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (wxh_model("wxh-ratio", upstream_size="aspect_ratio"), "needs named `sizes`"),
        (
            named_size_model(
                "decimal-ratio",
                upstream_size="aspect_ratio",
                sizes={"2.35:1": {"1K": [1568, 672]}},
                default_size="2.35:1",
            ),
            "size '2.35:1' is not an aspect ratio W:H",
        ),
        (
            named_size_model(
                "named",
                upstream_size="aspect_ratio",
                sizes={"square": {"1K": [1024, 1024]}},
                default_size="square",
            ),
            "size 'square' is not an aspect ratio W:H",
        ),
        (named_size_model("odd-form", upstream_size="inches"), "upstream_size"),
    ],
)
def test_upstream_size_that_cannot_be_sent_is_refused(model: dict[str, Any], expected: str) -> None:
    message = refusal(catalog_of(model))
    assert f"models[0] ({model['id']})" in message
    assert expected in message


def test_duplicate_model_id_is_refused_naming_the_id() -> None:
    message = refusal(catalog_of(named_size_model("twin"), wxh_model("twin")))
    assert "model id 'twin' appears twice" in message


def test_missing_price_is_refused_naming_the_model_and_field() -> None:
    model = wxh_model("priceless")
    del model["price"]
    message = refusal(catalog_of(model))
    assert "models[0] (priceless).price" in message
    assert "Field required" in message


def test_price_as_a_toml_float_is_refused_naming_the_model_and_field() -> None:
    raw = tomllib.loads(VALID_TOML.replace('amount = "0.25"', "amount = 0.25"))
    message = refusal(raw)
    assert "models[0] (toml-model).price.amount" in message
    assert "decimal string" in message


def test_surcharge_as_a_float_is_refused_naming_the_field() -> None:
    model = named_size_model(
        "floaty", price={"rule": "per_call", "amount": "0.03", "with_moodboard": 0.04}
    )
    message = refusal(catalog_of(model))
    assert "models[0] (floaty).price.with_moodboard" in message


@pytest.mark.parametrize("amount", ["-0.01", "nan", "ten"])
def test_negative_or_non_numeric_price_is_refused(amount: str) -> None:
    model = wxh_model("bad-amount", price={"rule": "per_megapixel_step", "amount": amount})
    message = refusal(catalog_of(model))
    assert "models[0] (bad-amount).price.amount" in message


def test_unknown_price_rule_is_refused_naming_the_field() -> None:
    model = named_size_model("odd-rule", price={"rule": "per_second", "amount": "1"})
    message = refusal(catalog_of(model))
    assert "models[0] (odd-rule).price.rule" in message


def test_both_sizes_and_dimensions_is_refused_naming_the_model() -> None:
    both = named_size_model("both", dimensions=wxh_model()["dimensions"])
    message = refusal(catalog_of(both))
    assert "models[0] (both)" in message
    assert "exactly one of `sizes`" in message
    assert "`dimensions`" in message


def test_neither_sizes_nor_dimensions_is_refused_naming_the_model() -> None:
    model = wxh_model("shapeless")
    del model["dimensions"]
    message = refusal(catalog_of(model))
    assert "models[0] (shapeless)" in message
    assert "exactly one of `sizes`" in message


def test_per_megapixel_step_without_steps_param_is_refused() -> None:
    message = refusal(catalog_of(wxh_model("stepless", params={})))
    assert "models[0] (stepless)" in message
    assert "num_inference_steps" in message


def test_default_size_not_in_sizes_is_refused_naming_the_field() -> None:
    message = refusal(catalog_of(named_size_model("lost", default_size="7:7")))
    assert "models[0] (lost)" in message
    assert "`default_size` '7:7' is not one of `sizes`" in message


def test_default_quality_not_offered_is_refused_naming_the_field() -> None:
    message = refusal(catalog_of(named_size_model("lost-q", default_quality="8K")))
    assert "models[0] (lost-q)" in message
    assert "`default_quality` '8K'" in message


def test_size_missing_a_quality_is_refused_naming_the_size() -> None:
    sizes = {"1:1": {"1K": [1024, 1024], "2K": [2048, 2048]}, "16:9": {"1K": [1344, 768]}}
    message = refusal(catalog_of(named_size_model("ragged", sizes=sizes)))
    assert "models[0] (ragged)" in message
    assert "size '16:9' does not list every quality" in message


def test_price_for_an_unknown_quality_is_refused() -> None:
    price = {"rule": "per_call", "amount": "1", "by_quality": {"4K": "3"}}
    message = refusal(catalog_of(named_size_model("no-4k", price=price)))
    assert "models[0] (no-4k)" in message
    assert "unknown quality ['4K']" in message


def test_common_field_declared_as_a_param_is_refused() -> None:
    params = {"prompt": {"type": "str"}}
    message = refusal(catalog_of(named_size_model("greedy", params=params)))
    assert "models[0] (greedy)" in message
    assert "`params.prompt` is a common field" in message


def test_enum_param_without_values_is_refused_naming_the_param() -> None:
    params = {"creativity": {"type": "enum"}}
    message = refusal(catalog_of(named_size_model("no-values", params=params)))
    assert "models[0] (no-values).params.creativity" in message
    assert "needs `values`" in message


def test_param_min_above_max_is_refused_naming_the_param() -> None:
    params = {"seed": {"type": "int", "min": 10, "max": 1}}
    message = refusal(catalog_of(named_size_model("upside-down", params=params)))
    assert "models[0] (upside-down).params.seed" in message


def test_unknown_field_in_a_model_is_refused_naming_it() -> None:
    message = refusal(catalog_of(named_size_model("typo", pricee="1")))
    assert "models[0] (typo).pricee" in message


def test_bad_model_id_is_refused() -> None:
    message = refusal(catalog_of(named_size_model("Has Spaces")))
    assert "models[0] (Has Spaces).id" in message


def test_error_names_the_model_by_its_position_and_id_when_not_first() -> None:
    message = refusal(catalog_of(named_size_model("fine"), named_size_model("broken", sizes={})))
    assert "models[1] (broken)" in message
    assert "(fine)" not in message


def test_every_problem_is_listed_in_one_error() -> None:
    first = named_size_model("first")
    del first["price"]
    second = wxh_model("second", price={"rule": "per_megapixel_step", "amount": 0.1})
    message = refusal(catalog_of(first, second))
    assert "models[0] (first).price" in message
    assert "models[1] (second).price.amount" in message


def test_group_pricing_an_unknown_model_is_refused_naming_group_and_model() -> None:
    groups = {
        "default": {},
        "vip": {"prices": {"ghost-model": {"rule": "per_call", "amount": "1"}}},
    }
    message = refusal(catalog_of(named_size_model("real"), groups=groups))
    assert "group 'vip' prices unknown models ['ghost-model']" in message


def test_groups_without_a_default_group_are_refused() -> None:
    message = refusal(catalog_of(named_size_model(), groups={"vip": {"multiplier": "2"}}))
    assert "`default` group" in message


def test_group_multiplier_as_a_float_is_refused_naming_the_group() -> None:
    groups = {"default": {}, "vip": {"multiplier": 1.5}}
    message = refusal(catalog_of(named_size_model(), groups=groups))
    assert "groups.vip.multiplier" in message


def test_group_own_price_and_multiplier_are_read_exactly() -> None:
    groups = {
        "default": {"multiplier": "1"},
        "vip": {
            "multiplier": "0.85",
            "prices": {"real": {"rule": "per_call", "amount": "0.5"}},
        },
    }
    catalog = parse_catalog(catalog_of(named_size_model("real"), groups=groups))
    vip = catalog.groups["vip"]
    assert vip.multiplier == Decimal("0.85")
    assert vip.prices["real"].amount == Decimal("0.5")


def test_missing_models_is_refused() -> None:
    assert "models: Field required" in refusal({})


def test_models_that_are_not_tables_are_refused_as_catalog_error() -> None:
    message = refusal({"models": ["krea-1"]})
    assert "models[0]" in message


def test_group_per_megapixel_step_price_on_a_stepless_model_is_refused() -> None:
    groups = {
        "default": {},
        "vip": {"prices": {"real": {"rule": "per_megapixel_step", "amount": "1"}}},
    }
    message = refusal(catalog_of(named_size_model("real"), groups=groups))
    assert "num_inference_steps" in message


def test_upstream_cost_per_megapixel_step_on_a_stepless_model_is_refused() -> None:
    cost = {"rule": "per_megapixel_step", "amount": "0.001"}
    message = refusal(catalog_of(named_size_model("real", upstream_cost=cost)))
    assert "models[0] (real)" in message
    assert "num_inference_steps" in message


def test_per_megapixel_step_steps_param_without_default_or_fixed_is_refused() -> None:
    params = {"num_inference_steps": {"type": "int", "min": 1, "max": 50}}
    message = refusal(catalog_of(wxh_model("optional-steps", params=params)))
    assert "models[0] (optional-steps)" in message
    assert "num_inference_steps" in message


def test_dimensions_default_outside_its_bounds_is_refused() -> None:
    dimensions = {"min_side": 256, "max_side": 2048, "max_pixels": 4_194_304, "default": "100x100"}
    message = refusal(catalog_of(wxh_model("tiny-default", dimensions=dimensions)))
    assert "models[0] (tiny-default).dimensions" in message


# Malformed catalogues, given as files.


def test_load_catalog_reads_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(VALID_TOML, encoding="utf-8")
    catalog = load_catalog(path)
    entry = catalog.model("toml-model")
    assert entry is not None
    assert entry.price.amount == Decimal("0.25")
    assert entry.dimensions is not None
    assert entry.dimensions.default == "1024x1024"


def test_load_catalog_of_a_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(CatalogError, match="cannot read model catalogue") as caught:
        load_catalog(path)
    assert str(path) in str(caught.value)


def test_load_catalog_of_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read model catalogue"):
        load_catalog(tmp_path)


def test_load_catalog_of_a_non_utf8_file_is_refused_as_catalog_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(VALID_TOML.replace("TOML model", "Mod\xe8le").encode("latin-1"))
    with pytest.raises(CatalogError, match=re.escape(str(path))):
        load_catalog(path)


def test_load_catalog_of_invalid_toml_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[[models]]\nid = "unterminated\n', encoding="utf-8")
    with pytest.raises(CatalogError, match="is not valid TOML") as caught:
        load_catalog(path)
    assert str(path) in str(caught.value)


def test_load_catalog_of_a_float_price_names_file_model_and_field(tmp_path: Path) -> None:
    path = tmp_path / "float.toml"
    path.write_text(VALID_TOML.replace('amount = "0.25"', "amount = 0.25"), encoding="utf-8")
    with pytest.raises(CatalogError) as caught:
        load_catalog(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid model catalogue")
    assert "models[0] (toml-model).price.amount" in message


def test_load_catalog_of_a_duplicate_id_names_the_id(tmp_path: Path) -> None:
    model_table = VALID_TOML.split("[[models]]", 1)[1]
    path = tmp_path / "twice.toml"
    path.write_text(VALID_TOML + "\n[[models]]" + model_table, encoding="utf-8")
    with pytest.raises(CatalogError, match="model id 'toml-model' appears twice"):
        load_catalog(path)


def test_load_catalog_of_a_missing_price_names_the_model(tmp_path: Path) -> None:
    path = tmp_path / "priceless.toml"
    text = VALID_TOML.replace('price = { rule = "per_image", amount = "0.25" }\n', "")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CatalogError, match=r"models\[0\] \(toml-model\)\.price: Field required"):
        load_catalog(path)


def test_shipped_catalogue_without_flux_dev_steps_names_flux_dev() -> None:
    edited = copy.deepcopy(shipped_raw())
    flux_dev = next(m for m in edited["models"] if m["id"] == "flux-1-dev")
    del flux_dev["params"]["num_inference_steps"]
    position = edited["models"].index(flux_dev)
    message = refusal(edited)
    assert f"models[{position}] (flux-1-dev)" in message
    assert "num_inference_steps" in message


def test_a_malformed_upstream_cost_figure_is_named_at_its_field() -> None:
    model = wxh_model("costly")
    del model["price"]
    model["upstream_cost"] = {"currency": "USD", "rule": "per_image", "amount": 0.5}
    raw = catalog_of(model)
    raw["exchange_rates"] = {"USD": "1"}
    message = refusal(raw)
    assert "models[0] (costly).upstream_cost.amount" in message
    assert "not a TOML number" in message
