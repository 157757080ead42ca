"""Request validation: catalogue defaults applied, refusals naming the offending field."""

import json
from typing import Any

import pytest

from pricing.catalog import ModelEntry, load_catalog, parse_catalog
from pricing.request import ImageRequest, InvalidField, resolve_request

CATALOG = load_catalog()


def model(model_id: str) -> ModelEntry:
    entry = CATALOG.model(model_id)
    assert entry is not None, model_id
    return entry


def resolve(model_id: str, **fields: Any) -> ImageRequest:
    fields.setdefault("prompt", "a glass cabin beside a frozen lake")
    return resolve_request(model(model_id), {"model": model_id, **fields})


def refused_field(model_id: str, **fields: Any) -> InvalidField:
    with pytest.raises(InvalidField) as caught:
        resolve(model_id, **fields)
    return caught.value


def small_wxh_model() -> ModelEntry:
    """A WxH model whose pixel cap is below max_side squared, so the cap can bite."""
    raw = {
        "models": [
            {
                "id": "capped",
                "name": "Capped",
                "provider": "test",
                "upstream_model": "test/capped",
                "images_per_generation": 1,
                "estimated_seconds": 1,
                "max_resolution": "2048",
                "prompt_max_chars": 10,
                "dimensions": {
                    "min_side": 256,
                    "max_side": 2048,
                    "multiple_of": 32,
                    "max_pixels": 1_048_576,
                },
                "price": {"rule": "per_image", "amount": "0.1"},
            }
        ]
    }
    entry = parse_catalog(raw).model("capped")
    assert entry is not None
    return entry


# Defaults.


def test_named_size_model_defaults_to_its_default_size_and_quality() -> None:
    request = resolve("krea-2-turbo")
    assert (request.size, request.quality) == ("1:1", "1K")
    assert (request.width, request.height) == (1024, 1024)
    assert request.images == 4
    assert request.steps is None


def test_named_size_is_turned_into_the_tables_pixels() -> None:
    request = resolve("krea-2-turbo", size="16:9", quality="2K")
    assert (request.size, request.quality) == ("16:9", "2K")
    assert (request.width, request.height) == (2688, 1472)


def test_param_defaults_are_applied_and_params_without_default_left_out() -> None:
    request = resolve("krea-2-turbo")
    assert dict(request.params) == {"nsfw_check": False}


def test_krea_2_medium_gets_its_creativity_and_slider_defaults() -> None:
    request = resolve("krea-2-medium")
    assert request.params["creativity"] == "medium"
    assert request.params["intensity"] == 0
    assert request.params["complexity"] == 0
    assert request.params["movement"] == 0
    assert request.images == 1
    assert not request.has_style_references
    assert not request.has_moodboard


def test_wxh_model_defaults_to_its_default_dimensions_and_steps() -> None:
    request = resolve("flux-1-dev")
    assert request.size == "1024x1024"
    assert request.quality is None
    assert (request.width, request.height) == (1024, 1024)
    assert request.steps == 20
    assert request.images == 1
    assert request.params["n"] == 1


@pytest.mark.parametrize("model_id", ["flux-1-schnell", "stable-diffusion-3-5-large-turbo"])
def test_fixed_steps_are_applied_when_absent(model_id: str) -> None:
    request = resolve(model_id)
    assert request.steps == 4
    assert request.params["num_inference_steps"] == 4


@pytest.mark.parametrize("model_id", ["flux-1-schnell", "stable-diffusion-3-5-large-turbo"])
def test_fixed_steps_may_be_sent_with_their_own_value(model_id: str) -> None:
    assert resolve(model_id, num_inference_steps=4).steps == 4


def test_given_values_replace_defaults() -> None:
    request = resolve(
        "stable-diffusion-3-5-large",
        size="1024x512",
        n=3,
        num_inference_steps=30,
        seed=42,
        negative_prompt="boats",
        nsfw_check=True,
    )
    assert (request.width, request.height) == (1024, 512)
    assert request.images == 3
    assert request.steps == 30
    assert request.params["seed"] == 42
    assert request.params["negative_prompt"] == "boats"
    assert request.params["nsfw_check"] is True


def test_explicit_null_counts_as_absent() -> None:
    request = resolve("flux-1-dev", num_inference_steps=None, size=None)
    assert request.steps == 20
    assert request.size == "1024x1024"


def test_common_fields_are_not_parameters() -> None:
    request = resolve("krea-1", callback_url="https://example.com/hook")
    assert "callback_url" not in request.params
    assert "model" not in request.params


def test_style_references_and_moodboard_are_seen() -> None:
    request = resolve("krea-2-large", image_style_references=["a"], moodboards=["m"])
    assert request.has_style_references
    assert request.has_moodboard


def test_empty_reference_lists_count_as_none() -> None:
    request = resolve("krea-2-large", image_style_references=[], moodboards=[])
    assert not request.has_style_references
    assert not request.has_moodboard


def test_seed_bounds_are_inclusive() -> None:
    assert resolve("krea-2-turbo", seed=0).params["seed"] == 0
    assert resolve("krea-2-turbo", seed=1_048_576).params["seed"] == 1_048_576


def test_prompt_of_exactly_the_limit_is_accepted() -> None:
    limit = model("flux-1-dev").prompt_max_chars
    assert len(resolve("flux-1-dev", prompt="x" * limit).prompt) == limit


# Refusals: each names the field.


def test_unknown_param_for_the_model_is_refused() -> None:
    error = refused_field("krea-2-turbo", n=2)
    assert error.field == "n"
    assert "not accepted by model krea-2-turbo" in error.message


def test_param_of_another_model_is_refused() -> None:
    assert refused_field("krea-2-turbo", moodboards=["m"]).field == "moodboards"
    assert refused_field("flux-1-dev", negative_prompt="boats").field == "negative_prompt"


@pytest.mark.parametrize("seed", [-1, 1_048_577])
def test_out_of_range_seed_is_refused(seed: int) -> None:
    error = refused_field("krea-2-turbo", seed=seed)
    assert error.field == "seed"
    assert str(error).startswith("seed: ")


@pytest.mark.parametrize("n", [0, 5])
def test_out_of_range_image_count_is_refused(n: int) -> None:
    assert refused_field("flux-1-pro", n=n).field == "n"


@pytest.mark.parametrize("steps", [0, 51])
def test_out_of_range_steps_are_refused(steps: int) -> None:
    assert refused_field("flux-1-dev", num_inference_steps=steps).field == "num_inference_steps"


@pytest.mark.parametrize("model_id", ["flux-1-schnell", "stable-diffusion-3-5-large-turbo"])
@pytest.mark.parametrize("steps", [1, 8, 20])
def test_fixed_steps_with_another_value_are_refused(model_id: str, steps: int) -> None:
    error = refused_field(model_id, num_inference_steps=steps)
    assert error.field == "num_inference_steps"
    assert f"fixed at 4 for model {model_id}" in error.message


MALFORMED_WXH = (
    "1024*1024",
    "1024",
    "1024x",
    "x1024",
    "1024X1024",
    " 1024x1024",
    "1024x1024 ",
    "axb",
    "01024x1024",
    "-1024x1024",
    "1024.0x1024",
    "123456x1024",
    "1:1",
)


@pytest.mark.parametrize("size", MALFORMED_WXH)
def test_malformed_wxh_size_is_refused(size: str) -> None:
    error = refused_field("flux-1-dev", size=size)
    assert error.field == "size"
    assert "WIDTHxHEIGHT" in error.message


def test_size_that_is_not_a_string_is_refused() -> None:
    assert refused_field("flux-1-dev", size=1024).field == "size"
    assert refused_field("krea-2-turbo", size=1).field == "size"


@pytest.mark.parametrize("size", ["224x1024", "1024x224", "2080x1024", "1024x2080"])
def test_wxh_side_out_of_bounds_is_refused(size: str) -> None:
    error = refused_field("flux-1-dev", size=size)
    assert error.field == "size"
    assert "between 256 and 2048" in error.message


def test_wxh_side_out_of_a_smaller_models_bounds_is_refused() -> None:
    # 2048 is fine for flux-1-dev, not for flux-1-pro (1440).
    assert resolve("flux-1-dev", size="2048x1024").width == 2048
    error = refused_field("flux-1-pro", size="2048x1024")
    assert error.field == "size"
    assert "between 256 and 1440" in error.message


@pytest.mark.parametrize("size", ["1000x1024", "1024x1000", "1040x1024"])
def test_wxh_side_not_a_multiple_of_32_is_refused(size: str) -> None:
    error = refused_field("flux-1-dev", size=size)
    assert error.field == "size"
    assert "multiple of 32" in error.message


def test_wxh_with_too_many_pixels_is_refused() -> None:
    entry = small_wxh_model()
    assert resolve_request(entry, {"prompt": "p", "size": "1024x1024"}).width == 1024
    with pytest.raises(InvalidField) as caught:
        resolve_request(entry, {"prompt": "p", "size": "2048x1024"})
    assert caught.value.field == "size"
    assert "at most 1048576 pixels" in caught.value.message


def test_quality_on_a_wxh_model_is_refused() -> None:
    error = refused_field("flux-1-dev", quality="1K")
    assert error.field == "quality"
    assert "use size as WxH" in error.message


def test_quality_not_a_string_is_refused() -> None:
    assert refused_field("krea-2-turbo", quality=2).field == "quality"


def test_quality_the_model_does_not_offer_is_refused() -> None:
    error = refused_field("krea-2-medium", quality="2K")
    assert error.field == "quality"
    assert "must be one of 1K" in error.message


def test_named_size_the_model_does_not_offer_is_refused() -> None:
    assert refused_field("krea-2-turbo", size="2.35:1").field == "size"
    assert refused_field("krea-2-medium", size="1024x1024").field == "size"


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", None, 42, ["a prompt"]])
def test_empty_or_non_string_prompt_is_refused(prompt: Any) -> None:
    error = refused_field("krea-1", prompt=prompt)
    assert error.field == "prompt"
    assert "non-empty string" in error.message


def test_missing_prompt_is_refused() -> None:
    with pytest.raises(InvalidField) as caught:
        resolve_request(model("krea-1"), {"model": "krea-1"})
    assert caught.value.field == "prompt"


def test_too_long_prompt_is_refused() -> None:
    limit = model("krea-2-turbo").prompt_max_chars
    error = refused_field("krea-2-turbo", prompt="x" * (limit + 1))
    assert error.field == "prompt"
    assert f"at most {limit} characters" in error.message


@pytest.mark.parametrize(("name", "value"), [("seed", True), ("n", True), ("n", False)])
def test_bool_given_for_an_int_param_is_refused(name: str, value: bool) -> None:
    error = refused_field("flux-1-dev", **{name: value})
    assert error.field == name
    assert "integer" in error.message


@pytest.mark.parametrize("value", ["5", 5.0, [5]])
def test_non_integer_for_an_int_param_is_refused(value: Any) -> None:
    assert refused_field("flux-1-dev", seed=value).field == "seed"


@pytest.mark.parametrize("value", [1, 0, "true", "false"])
def test_non_bool_for_a_bool_param_is_refused(value: Any) -> None:
    error = refused_field("flux-1-dev", nsfw_check=value)
    assert error.field == "nsfw_check"
    assert "true or false" in error.message


@pytest.mark.parametrize("value", ["extreme", "Medium", "", 1, ["medium"]])
def test_enum_value_not_allowed_is_refused(value: Any) -> None:
    error = refused_field("krea-2-medium", creativity=value)
    assert error.field == "creativity"
    assert "raw, low, medium, high" in error.message


def test_string_param_too_long_or_not_a_string_is_refused() -> None:
    assert refused_field("stable-diffusion-3-5-large", negative_prompt="x" * 2001).field == (
        "negative_prompt"
    )
    assert refused_field("stable-diffusion-3-5-large", negative_prompt=7).field == (
        "negative_prompt"
    )


def test_more_than_one_moodboard_is_refused() -> None:
    error = refused_field("krea-2-medium", moodboards=["m1", "m2"])
    assert error.field == "moodboards"
    assert "at most 1 item(s)" in error.message


def test_too_many_style_references_for_krea_1_are_refused() -> None:
    assert resolve("krea-1", image_style_references=["a", "b"]).has_style_references
    assert refused_field("krea-1", image_style_references=["a", "b", "c"]).field == (
        "image_style_references"
    )


def test_list_param_given_a_scalar_is_refused() -> None:
    error = refused_field("krea-2-medium", moodboards="m1")
    assert error.field == "moodboards"
    assert "array" in error.message


def test_prompt_is_checked_before_the_other_fields() -> None:
    assert refused_field("krea-2-turbo", prompt="", n=3, size="nope").field == "prompt"


# Storage round trip.


@pytest.mark.parametrize(
    "fields",
    [
        {"model_id": "krea-2-turbo", "size": "9:16", "quality": "2K", "seed": 7},
        {"model_id": "krea-2-medium", "moodboards": ["m"], "image_style_references": ["a"]},
        {"model_id": "flux-1-dev", "size": "1024x512", "n": 2, "num_inference_steps": 30},
        {"model_id": "stable-diffusion-3-5-large-turbo", "negative_prompt": "boats"},
        {"model_id": "flux-1-1-pro-ultra", "size": "9:21", "seed": 3},
        {"model_id": "chatgpt-image", "size": "3:2", "quality": "high"},
    ],
)
def test_image_request_round_trips_through_json(fields: dict[str, Any]) -> None:
    model_id = fields.pop("model_id")
    request = resolve(model_id, **fields)
    stored = json.loads(json.dumps(request.to_json()))
    assert ImageRequest.from_json(stored) == request
    assert ImageRequest.from_json(request.to_json()) == request


def test_image_request_json_carries_everything_pricing_counts() -> None:
    request = resolve("stable-diffusion-3-5-large-turbo", size="1024x512", n=2)
    assert request.to_json() == {
        "model": "stable-diffusion-3-5-large-turbo",
        "prompt": "a glass cabin beside a frozen lake",
        "size": "1024x512",
        "quality": None,
        "width": 1024,
        "height": 512,
        "images": 2,
        "steps": 4,
        "params": {
            "nsfw_check": False,
            "n": 2,
            "num_inference_steps": 4,
            "prompt_enhancement": False,
        },
        "upstream_size": None,
    }


def test_image_request_carries_upstream_size_and_reads_rows_stored_without_it() -> None:
    ultra = resolve("flux-1-1-pro-ultra", size="21:9")
    assert (ultra.size, ultra.width, ultra.height) == ("21:9", 2048, 864)
    assert ultra.upstream_size == "aspect_ratio"
    assert resolve("flux-1-1-pro").upstream_size == "pixels"
    assert resolve("krea-1").upstream_size is None
    stored = ultra.to_json()
    assert ImageRequest.from_json(stored) == ultra
    del stored["upstream_size"]  # a task stored before the field existed
    assert ImageRequest.from_json(stored).upstream_size is None


def test_image_request_json_is_a_copy_of_the_params() -> None:
    request = resolve("krea-2-medium")
    data = request.to_json()
    data["params"]["creativity"] = "high"
    assert request.params["creativity"] == "medium"
