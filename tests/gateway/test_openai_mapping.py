"""The rule that maps OpenAI's image request onto the catalogue (docs/openai.md)."""

from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.openai_api.mapping import unified_fields
from pricing.catalog import load_catalog

CATALOG = load_catalog()


def mapped(model: str, **body: Any) -> dict[str, Any]:
    entry = CATALOG.model(model)
    assert entry is not None
    return unified_fields(entry, {"model": model, "prompt": "p", **body}).fields


def refused(model: str, **body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        mapped(model, **body)
    return caught.value


@pytest.mark.parametrize(
    ("size", "aspect", "quality"),
    [
        ("1024x1024", "1:1", "1K"),
        ("2048x2048", "1:1", "2K"),
        ("1792x1024", "16:9", "1K"),
        ("1024x1792", "9:16", "1K"),
        ("1536x1024", "3:2", "1K"),
        ("1024x1536", "2:3", "1K"),
        ("512x512", "1:1", "1K"),  # smaller than every tier: the nearest is the smallest
        ("3000x1500", "2:1", "2K"),
        ("4096x4096", "1:1", "2K"),
    ],
)
def test_pixels_go_to_the_nearest_aspect_then_the_nearest_tier(
    size: str, aspect: str, quality: str
) -> None:
    assert mapped("krea-2-turbo", size=size, n=4) == {
        "model": "krea-2-turbo",
        "prompt": "p",
        "size": aspect,
        "quality": quality,
    }


def test_a_ratio_between_two_aspects_goes_to_the_closer_in_log_scale() -> None:
    # 1.6 lies between 3:2 (1.5) and 16:9 (1.78); ln-distance 0.065 vs 0.105.
    assert mapped("krea-2-medium", size="1280x800")["size"] == "3:2"


def test_quality_tiers_and_hd() -> None:
    assert mapped("krea-2-turbo", size="1024x1024", quality="hd")["quality"] == "2K"
    assert mapped("krea-2-turbo", quality="2K")["quality"] == "2K"
    assert mapped("krea-2-turbo", size="2048x2048", quality="standard")["quality"] == "2K"
    assert mapped("chatgpt-image", size="1536x1024", quality="high", n=2) == {
        "model": "chatgpt-image",
        "prompt": "p",
        "size": "3:2",
        "quality": "high",
    }
    assert refused("krea-2-turbo", quality="ultra").field == "quality"


def test_auto_or_no_size_is_the_models_default() -> None:
    assert mapped("krea-2-turbo", size="auto") == {"model": "krea-2-turbo", "prompt": "p"}
    assert mapped("flux-1-schnell") == {"model": "flux-1-schnell", "prompt": "p"}
    assert mapped("krea-2-medium", size="16:9")["size"] == "16:9"


def test_pixel_models_take_the_size_as_sent_and_no_tiers() -> None:
    assert mapped("flux-1-schnell", size="768x512", quality="standard") == {
        "model": "flux-1-schnell",
        "prompt": "p",
        "size": "768x512",
    }
    assert refused("flux-1-schnell", quality="hd").field == "quality"
    assert refused("flux-1-schnell", size="16:9").field == "size"


def test_n_is_passed_on_or_must_match_a_fixed_count() -> None:
    assert mapped("flux-1-schnell", n=3)["n"] == 3
    assert "n" not in mapped("krea-2-turbo", n=4)
    error = refused("krea-2-turbo", n=1)
    assert error.field == "n"
    assert "makes 4 images per generation" in error.message
    assert refused("flux-1-schnell", n="2").field == "n"


def test_openai_only_fields_are_accepted_or_refused_by_name() -> None:
    assert mapped(
        "flux-1-schnell", style="vivid", user="u-1", moderation="auto", background="auto"
    ) == {"model": "flux-1-schnell", "prompt": "p"}
    assert refused("flux-1-schnell", style="loud").field == "style"
    assert refused("flux-1-schnell", background="transparent").field == "background"
    assert refused("flux-1-schnell", output_format="webp").field == "output_format"
    assert refused("flux-1-schnell", stream=True).field == "stream"
    assert refused("flux-1-schnell", partial_images=2).field == "partial_images"
    assert refused("flux-1-schnell", response_format="png").field == "response_format"


def test_catalogue_fields_pass_through_and_others_are_unknown() -> None:
    fields = mapped("flux-1-schnell", seed=7, callback_url="https://example.com/hook")
    assert fields["seed"] == 7
    assert fields["callback_url"] == "https://example.com/hook"
    assert refused("flux-1-schnell", colour="red").message == "colour: unknown field"


def test_response_format_defaults_to_url() -> None:
    entry = CATALOG.model("flux-1-schnell")
    assert entry is not None
    assert unified_fields(entry, {"prompt": "p"}).response_format == "url"
    assert unified_fields(
        entry, {"prompt": "p", "response_format": "b64_json"}
    ).response_format == ("b64_json")
