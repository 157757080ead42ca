"""The provider adapters and the catalogue: every model against the in-process simulator, and
every size of every model translated to its upstream's wire parameters."""

from typing import Any

import httpx
import pytest
from provider_calls import CATALOG, SCHNELL, entry, generate, image_sizes, provider, request_for

from pricing.catalog import ModelEntry
from pricing.request import ImageRequest, InvalidField, resolve_request
from workers.providers.bfl import bfl_body
from workers.providers.krea import krea_body
from workers.providers.openai import openai_body
from workers.providers.siliconflow import siliconflow_body
from workers.providers.unified import unified_body
from workers.simulator.app import SimulatorConfig, parse_generation
from workers.simulator.bfl import parse_bfl_request
from workers.simulator.core import Generation
from workers.simulator.openai import parse_openai_request
from workers.simulator.siliconflow import parse_images_request
from workers.simulator.sizes import image_size
from workers.simulator.unified import parse_unified_request


@pytest.mark.parametrize("model", CATALOG.models, ids=lambda model: model.id)
async def test_catalogue_model_default_request_completes_with_images_of_the_resolved_size(
    sim_http: httpx.AsyncClient, model: ModelEntry
) -> None:
    request = resolve_request(model, {"prompt": "x"})
    state = await generate(provider(model.provider, sim_http), model.upstream_model, request)
    assert state.status == "completed"
    assert state.progress == 100
    if model.provider == "krea":
        # Krea is sent no image count: the upstream's per-model table decides, so the
        # catalogue's count must be the one that table gives.
        table = SimulatorConfig()
        upstream = table.images_per_model.get(model.upstream_model, table.default_num_images)
        assert upstream == model.images_per_generation
    sizes = await image_sizes(sim_http, state)
    assert sizes == [(request.width, request.height)] * request.images


@pytest.mark.parametrize(
    "model", [m for m in CATALOG.models if m.provider == "krea"], ids=lambda model: model.id
)
def test_krea_catalogue_sizes_are_the_upstream_pixel_sizes(model: ModelEntry) -> None:
    assert model.sizes is not None
    for size, by_quality in model.sizes.items():
        for quality, pixels in by_quality.items():
            assert image_size(size, quality) == pixels, (size, quality)


# --- every size of every catalogue model, as its upstream reads it ------------------------------


def catalogue_sizes(model: ModelEntry) -> list[tuple[str, str | None, tuple[int, int]]]:
    """Every (size, quality, pixels) of a named-size model; corners and the default of WxH."""
    if model.sizes is not None:
        return [
            (size, quality, tuple(pixels))  # type: ignore[misc]
            for size, by_quality in model.sizes.items()
            for quality, pixels in by_quality.items()
        ]
    bounds = model.dimensions
    assert bounds is not None
    low, high = bounds.min_side, bounds.max_side
    square = int(bounds.max_pixels**0.5) // bounds.multiple_of * bounds.multiple_of
    found = []
    for w, h in [(low, low), (high, low), (low, high), (square, square), (high // 2, low)]:
        size = f"{w}x{h}"
        try:
            resolve_request(model, {"prompt": "x", "size": size})
        except InvalidField:
            continue
        found.append((size, None, (w, h)))
    width, _, height = bounds.default.partition("x")
    return [*found, (bounds.default, None, (int(width), int(height)))]


def wire_size(
    model: ModelEntry, size: str, quality: str | None, pixels: tuple[int, int]
) -> dict[str, Any]:
    """What each upstream is sent for a size: the unified size and quality, in its own words."""
    w, h = pixels
    match model.provider:
        case "krea":
            return {"aspect_ratio": size, "resolution": quality}
        case "siliconflow":
            return {"image_size": f"{w}x{h}"}
        case "unified":
            return {"size": size, "quality": quality}
        case "openai":
            return {"size": f"{w}x{h}", "quality": quality}
        case "bfl" if model.upstream_size == "aspect_ratio":
            return {"aspect_ratio": size}
        case "bfl":
            return {"width": w, "height": h}
    raise AssertionError(f"no wire format known for provider {model.provider}")


def upstream_reading(model: ModelEntry, request: ImageRequest) -> tuple[dict[str, Any], Generation]:
    """The body the model's adapter sends, and what the simulated upstream makes of it."""
    upstream = model.upstream_model
    match model.provider:
        case "krea":
            body = krea_body(request)
            return body, parse_generation(body)
        case "siliconflow":
            body = siliconflow_body(upstream, request)
            sf = parse_images_request(body)
            return body, Generation(sf.prompt, sf.width, sf.height, sf.seed, sf.batch_size)
        case "unified":
            body = unified_body(upstream, request)
            return body, parse_unified_request(body).generation
        case "openai":
            body = openai_body(upstream, request)
            return body, parse_openai_request(body).generation
        case "bfl":
            body = bfl_body(request)
            return body, parse_bfl_request(upstream, body).generation
    raise AssertionError(f"no adapter known for provider {model.provider}")


@pytest.mark.parametrize("model", CATALOG.models, ids=lambda model: model.id)
def test_every_size_and_quality_reaches_the_upstream_as_the_catalogues_pixels(
    model: ModelEntry,
) -> None:
    table = SimulatorConfig()
    for size, quality, pixels in catalogue_sizes(model):
        fields = {"prompt": "x", "size": size, **({"quality": quality} if quality else {})}
        request = resolve_request(model, fields)
        assert (request.width, request.height) == pixels
        body, generation = upstream_reading(model, request)
        expected = {k: v for k, v in wire_size(model, size, quality, pixels).items() if v}
        assert {k: body.get(k) for k in expected} == expected, (size, quality)
        assert (generation.width, generation.height) == pixels, (size, quality)
        upstream_count = generation.num_images or table.images_per_model.get(
            model.upstream_model, table.default_num_images
        )
        assert upstream_count == request.images, (size, quality)


@pytest.mark.parametrize(
    "model", [m for m in CATALOG.models if m.provider == "siliconflow"], ids=lambda m: m.id
)
def test_siliconflow_sends_the_fixed_steps_of_models_that_take_none(model: ModelEntry) -> None:
    # seeds/004: FLUX.1-schnell and SD 3.5 Large Turbo run a fixed 4 steps.
    fixed = model.upstream_model in (SCHNELL, "stabilityai/stable-diffusion-3-5-large-turbo")
    spec = model.params["num_inference_steps"]
    assert spec.fixed == (4 if fixed else None)
    body = siliconflow_body(model.upstream_model, resolve_request(model, {"prompt": "x"}))
    assert body["num_inference_steps"] == (4 if fixed else spec.default)
    assert parse_images_request(body).steps == body["num_inference_steps"]


async def test_krea_request_with_size_quality_and_seed_completes_at_its_size(
    sim_http: httpx.AsyncClient,
) -> None:
    request = request_for("krea-1", size="16:9", quality="2K", seed=42)
    state = await generate(provider("krea", sim_http), "krea/krea-1", request)
    assert await image_sizes(sim_http, state) == [(2688, 1472)] * 4


@pytest.mark.parametrize(
    ("model_id", "fields"),
    [
        (
            "stable-diffusion-3-5-large",
            {
                "size": "512x768",
                "n": 3,
                "num_inference_steps": 30,
                "negative_prompt": "boats",
                "seed": 1234,
                "prompt_enhancement": True,
            },
        ),
        ("flux-1-dev", {"size": "2048x256", "n": 4, "seed": 9_999_999_999}),
        ("flux-1-schnell", {"size": "256x2048", "n": 1, "num_inference_steps": 4}),
        ("stable-diffusion-3-5-large-turbo", {"size": "1344x768", "n": 2}),
    ],
)
async def test_siliconflow_request_with_options_completes_with_n_images_at_its_size(
    sim_http: httpx.AsyncClient, model_id: str, fields: dict[str, Any]
) -> None:
    request = request_for(model_id, **fields)
    state = await generate(
        provider("siliconflow", sim_http), entry(model_id).upstream_model, request
    )
    assert state.status == "completed"
    sizes = await image_sizes(sim_http, state)
    assert sizes == [(request.width, request.height)] * fields["n"]
