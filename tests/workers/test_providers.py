"""The provider adapters: every catalogue model against the simulator in-process, every size
of every model translated to its upstream's wire parameters, each protocol's faults, and the
error tree against canned upstream answers (``httpx.MockTransport``)."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from conftest import SIM_KEY, Sim, bearer
from litestar.testing import AsyncTestClient

from pricing.catalog import ModelEntry, load_catalog
from pricing.request import ImageRequest, InvalidField, resolve_request
from workers.images import image_of
from workers.providers import ADAPTERS
from workers.providers.base import (
    Endpoint,
    JobState,
    Provider,
    UpstreamBadResult,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from workers.providers.bfl import bfl_body
from workers.providers.krea import krea_body
from workers.providers.openai import openai_body
from workers.providers.siliconflow import siliconflow_body
from workers.providers.unified import unified_body
from workers.simulator.app import SimulatorConfig, create_simulator_app, parse_generation
from workers.simulator.bfl import parse_bfl_request
from workers.simulator.core import Generation
from workers.simulator.openai import parse_openai_request
from workers.simulator.png import png_size
from workers.simulator.siliconflow import parse_images_request
from workers.simulator.sizes import image_size
from workers.simulator.unified import parse_unified_request

API_KEY = "sk-adapter-test-5f0c1e9a"
SIM_BASE = "http://sim.test"
# Where each protocol lives in the one simulator: a channel's base URL includes the prefix.
BASES = {
    "krea": SIM_BASE,
    "siliconflow": SIM_BASE,
    "unified": f"{SIM_BASE}/unified",
    "openai": f"{SIM_BASE}/openai",
    "bfl": f"{SIM_BASE}/bfl",
}
PREFIXES = {name: base.removeprefix(SIM_BASE) for name, base in BASES.items()}
# Where the canned answers pretend to live: neither may ever show up in an error message.
SECRET_HOST = "upstream-7c2e.internal"
SECRET_BASE = f"https://{SECRET_HOST}:8443/api"
CATALOG = load_catalog()
KREA_MODEL = "krea/krea-2/medium"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
MAX_IMAGE_BYTES = 50_000_000


def entry(model_id: str) -> ModelEntry:
    found = CATALOG.model(model_id)
    assert found is not None, model_id
    return found


def provider(
    name: str, http: httpx.AsyncClient, *, base: str | None = None, **limits: float
) -> Provider:
    endpoint = Endpoint(base_url=base or BASES[name], api_key=API_KEY, **limits)
    return ADAPTERS[name](http, endpoint)


def request_for(model_id: str, **fields: Any) -> ImageRequest:
    return resolve_request(entry(model_id), {"prompt": "a lighthouse at dusk", **fields})


@pytest.fixture
async def sim_http() -> AsyncIterator[httpx.AsyncClient]:
    """A client whose every request, image downloads included, goes to one in-process simulator."""
    app = create_simulator_app(SimulatorConfig(api_key=API_KEY, latency=0.0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=SIM_BASE) as http:
        yield http


async def configure(http: httpx.AsyncClient, **knobs: Any) -> None:
    response = await http.post(f"{SIM_BASE}/_sim/config", json=knobs)
    assert response.status_code == 200, response.text


async def stats(http: httpx.AsyncClient) -> dict[str, int]:
    found: dict[str, int] = (await http.get(f"{SIM_BASE}/_sim/stats")).json()
    return found


async def generate(adapter: Provider, upstream_model: str, request: ImageRequest) -> JobState:
    """Submit, then poll an async upstream until its job is final."""
    submitted = await adapter.submit(upstream_model, request)
    if submitted.state is not None:
        return submitted.state
    assert submitted.job_id is not None
    for _ in range(100):
        state = await adapter.poll(submitted.job_id)
        if state.status in ("completed", "failed", "cancelled"):
            return state
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {submitted.job_id} never finished")


async def result_bytes(http: httpx.AsyncClient, state: JobState) -> list[bytes]:
    """The results as bytes: inline images as they came, links downloaded."""
    found = list(state.images)
    for url in state.urls:
        response = await http.get(url)
        assert response.status_code == 200, url
        found.append(response.content)
    return found


async def image_sizes(http: httpx.AsyncClient, state: JobState) -> list[tuple[int, int]]:
    return [png_size(data) for data in await result_bytes(http, state)]


# --- every catalogue model against the simulator ------------------------------------------------


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


# --- adapters against the simulator's faults ----------------------------------------------------

NAMES = list(BASES)
# One typical call per adapter: (upstream model, catalogue model whose request it sends).
DEFAULTS = {
    "krea": (KREA_MODEL, "krea-2-medium"),
    "siliconflow": (SCHNELL, "flux-1-schnell"),
    # A Krea model's request, sent on in the unified words.
    "unified": ("krea-2-medium", "krea-2-medium"),
    "openai": ("gpt-image-1", "chatgpt-image"),
    "bfl": ("flux-pro-1.1", "flux-1-1-pro"),
}


def default_call(name: str) -> Callable[[Provider], Awaitable[Any]]:
    upstream_model, model_id = DEFAULTS[name]
    return lambda adapter: adapter.submit(upstream_model, request_for(model_id))


async def default_state(name: str, http: httpx.AsyncClient) -> JobState:
    upstream_model, model_id = DEFAULTS[name]
    return await generate(provider(name, http), upstream_model, request_for(model_id))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("knobs", "error", "retry_after"),
    [
        ({"error_kind": "submit_500"}, UpstreamUnavailable, None),
        ({"fail_first_n": 1}, UpstreamUnavailable, None),
        ({"error_kind": "submit_429", "retry_after": 3}, UpstreamUnavailable, 3.0),
        ({"error_kind": "malformed"}, UpstreamProtocolError, None),
    ],
)
async def test_simulated_submit_faults_raise_retryable_errors(
    sim_http: httpx.AsyncClient,
    name: str,
    knobs: dict[str, Any],
    error: type[UpstreamError],
    retry_after: float | None,
) -> None:
    await configure(sim_http, **knobs)
    with pytest.raises(error) as raised:
        await default_call(name)(provider(name, sim_http))
    assert raised.value.retryable
    assert raised.value.retry_after == retry_after
    assert raised.value.rate_limited == (retry_after is not None)
    assert_in_our_words(raised.value)
    assert (await stats(sim_http))["jobs_active"] == 0


@pytest.mark.parametrize("name", NAMES)
async def test_submit_after_fail_first_n_succeeds(sim_http: httpx.AsyncClient, name: str) -> None:
    await configure(sim_http, fail_first_n=1)
    with pytest.raises(UpstreamUnavailable):
        await default_call(name)(provider(name, sim_http))
    assert (await default_state(name, sim_http)).status == "completed"
    assert (await stats(sim_http))["submits"] == 2


@pytest.mark.parametrize("name", NAMES)
async def test_wrong_api_key_is_unavailable_not_the_requests_fault(
    sim_http: httpx.AsyncClient, name: str
) -> None:
    account = Endpoint(base_url=BASES[name], api_key="sk-wrong")
    with pytest.raises(UpstreamUnavailable, match="credentials") as raised:
        await default_call(name)(ADAPTERS[name](sim_http, account))
    assert "sk-wrong" not in raised.value.message
    assert (await stats(sim_http))["submits"] == 0


@pytest.mark.parametrize("name", NAMES)
async def test_bad_image_results_are_refused_by_their_bytes(
    sim_http: httpx.AsyncClient, name: str
) -> None:
    await configure(sim_http, error_kind="bad_image")
    state = await default_state(name, sim_http)
    assert state.status == "completed"
    for data in await result_bytes(sim_http, state):
        with pytest.raises(UpstreamBadResult):
            image_of(data, MAX_IMAGE_BYTES)


@pytest.mark.parametrize("name", NAMES)
async def test_hang_outlasting_the_submit_limit_is_unavailable_in_our_words(
    simulator: Sim, name: str
) -> None:
    await simulator.configure(error_kind="hang", hang_seconds=3)
    base = simulator.url + PREFIXES[name]
    async with httpx.AsyncClient() as http:
        adapter = ADAPTERS[name](http, Endpoint(base_url=base, api_key=SIM_KEY, submit_timeout=0.3))
        with pytest.raises(UpstreamUnavailable, match="did not answer in time") as raised:
            await default_call(name)(adapter)
    assert raised.value.retryable
    assert "127.0.0.1" not in raised.value.message
    assert SIM_KEY not in raised.value.message


@pytest.mark.parametrize("name", ["krea", "unified", "bfl"])
async def test_failed_job_polls_as_failed_in_our_words(
    sim_http: httpx.AsyncClient, name: str
) -> None:
    await configure(sim_http, error_kind="job_failed")
    state = await default_state(name, sim_http)
    assert state.status == "failed"
    assert state.urls == ()
    assert state.error == "the upstream could not generate the image"


@pytest.mark.parametrize("name", ["siliconflow", "openai"])
async def test_failed_synchronous_generation_is_an_upstream_error(
    sim_http: httpx.AsyncClient, name: str
) -> None:
    await configure(sim_http, error_kind="job_failed")
    with pytest.raises(UpstreamUnavailable) as raised:
        await default_call(name)(provider(name, sim_http))
    assert_in_our_words(raised.value)


@pytest.mark.parametrize(
    ("name", "upstream_model", "model_id", "changes"),
    [
        # Requests the catalogue would refuse, so the upstream's 400 is reached.
        ("krea", KREA_MODEL, "krea-2-medium", {"size": "7:3"}),
        ("siliconflow", SCHNELL, "flux-1-schnell", {"width": 8192, "height": 1024}),
        ("siliconflow", SCHNELL, "flux-1-schnell", {"images": 5}),
        ("unified", "krea-2-medium", "krea-2-medium", {"size": "7:3"}),
        ("unified", "flux-1-dev", "flux-1-dev", {"params": {"guidance": 3}}),
        ("openai", "gpt-image-1", "chatgpt-image", {"quality": "ultra"}),
        ("openai", "gpt-image-1", "chatgpt-image", {"width": 1792}),
        ("openai", "dall-e-3", "chatgpt-image", {"quality": "hd"}),  # n=2: one at most
        ("bfl", "flux-pro-1.1", "flux-1-1-pro", {"width": 1000}),
        ("bfl", "flux-pro-1.1-ultra", "flux-1-1-pro-ultra", {"upstream_size": "pixels"}),
        ("bfl", "flux-pro-1.1", "flux-1-1-pro", {"upstream_size": "aspect_ratio"}),
    ],
)
async def test_request_the_upstream_refuses_is_rejected_for_good(
    sim_http: httpx.AsyncClient,
    name: str,
    upstream_model: str,
    model_id: str,
    changes: dict[str, Any],
) -> None:
    request = ImageRequest(**{**request_for(model_id).to_json(), **changes})
    with pytest.raises(UpstreamRejected) as raised:
        await provider(name, sim_http).submit(upstream_model, request)
    assert not raised.value.retryable
    assert_in_our_words(raised.value)


@pytest.mark.parametrize("name", ["krea", "unified"])
async def test_cancel_stops_an_active_job_and_refuses_a_final_one(
    sim_http: httpx.AsyncClient, name: str
) -> None:
    await configure(sim_http, latency=5)
    upstream_model, model_id = DEFAULTS[name]
    adapter = provider(name, sim_http)
    assert adapter.supports_cancel
    submitted = await adapter.submit(upstream_model, request_for(model_id))
    assert submitted.job_id is not None
    assert (await adapter.poll(submitted.job_id)).status == "pending"
    await adapter.cancel(submitted.job_id)
    assert (await adapter.poll(submitted.job_id)).status == "cancelled"
    with pytest.raises(UpstreamRejected):
        await adapter.cancel(submitted.job_id)
    assert (await stats(sim_http))["jobs_active"] == 0


@pytest.mark.parametrize("name", ["siliconflow", "openai"])
async def test_synchronous_adapter_has_no_job_to_poll_or_cancel(
    sim_http: httpx.AsyncClient, name: str
) -> None:
    adapter = provider(name, sim_http)
    assert not adapter.supports_cancel
    with pytest.raises(UpstreamRejected):
        await adapter.poll("anything")
    with pytest.raises(UpstreamRejected):
        await adapter.cancel("anything")
    assert (await stats(sim_http))["submits"] == 0


async def test_unified_task_moves_pending_processing_completed_with_progress(
    sim_http: httpx.AsyncClient,
) -> None:
    await configure(sim_http, latency=0.6)
    adapter = provider("unified", sim_http)
    submitted = await adapter.submit("krea-2-medium", request_for("krea-2-medium", size="16:9"))
    assert submitted.job_id is not None
    first = await adapter.poll(submitted.job_id)
    await asyncio.sleep(0.3)
    second = await adapter.poll(submitted.job_id)
    await asyncio.sleep(0.4)
    done = await adapter.poll(submitted.job_id)
    assert [(s.status, s.progress) for s in (first, second)] == [
        ("pending", 0),
        ("processing", 50),
    ]
    assert (done.status, done.progress) == ("completed", 100)
    assert await image_sizes(sim_http, done) == [(1344, 768)]


async def test_unified_passes_wxh_sizes_and_parameters_under_their_own_names(
    sim_http: httpx.AsyncClient,
) -> None:
    request = request_for("flux-1-dev", size="512x768", n=3, num_inference_steps=30, seed=5)
    state = await generate(provider("unified", sim_http), "flux-1-dev", request)
    assert await image_sizes(sim_http, state) == [(512, 768)] * 3


async def test_unified_unknown_task_is_unavailable_like_any_404(
    sim_http: httpx.AsyncClient,
) -> None:
    with pytest.raises(UpstreamUnavailable, match="HTTP 404"):
        await provider("unified", sim_http).poll("task-unified-0-nosuchtask")


async def test_openai_gpt_image_answers_inline_images_at_the_catalogue_size(
    sim_http: httpx.AsyncClient,
) -> None:
    request = request_for("chatgpt-image", size="2:3", quality="high")
    state = await generate(provider("openai", sim_http), "gpt-image-1", request)
    assert state.urls == ()
    assert len(state.images) == 2
    assert [png_size(data) for data in state.images] == [(1024, 1536)] * 2
    assert len(set(state.images)) == 2
    assert (await stats(sim_http))["image_downloads"] == 2


async def test_openai_dall_e_answers_links_the_worker_downloads(
    sim_http: httpx.AsyncClient,
) -> None:
    fields = {**request_for("chatgpt-image").to_json(), "quality": "hd", "images": 1}
    state = await generate(provider("openai", sim_http), "dall-e-3", ImageRequest(**fields))
    assert state.images == ()
    [url] = state.urls
    assert url.startswith(f"{SIM_BASE}/images/")
    assert await image_sizes(sim_http, state) == [(1024, 1024)]


async def test_bfl_job_id_is_the_polling_url_and_a_fresh_adapter_resumes_with_it(
    sim_http: httpx.AsyncClient,
) -> None:
    await configure(sim_http, latency=0.3)
    request = request_for("flux-1-1-pro-ultra", size="9:21", seed=77)
    submitted = await provider("bfl", sim_http).submit("flux-pro-1.1-ultra", request)
    assert submitted.job_id is not None
    assert submitted.job_id.startswith(f"{SIM_BASE}/bfl/v1/get_result?id=")
    # A resumed run has nothing but the stored id and a new adapter for the channel.
    resumed = provider("bfl", sim_http)
    assert (await resumed.poll(submitted.job_id)).status == "processing"
    await asyncio.sleep(0.35)
    state = await resumed.poll(submitted.job_id)
    assert (state.status, state.progress) == ("completed", 100)
    assert await image_sizes(sim_http, state) == [(864, 2048)]


async def test_bfl_cannot_cancel_and_says_so_without_calling(sim_http: httpx.AsyncClient) -> None:
    adapter = provider("bfl", sim_http)
    assert not adapter.supports_cancel
    with pytest.raises(UpstreamRejected):
        await adapter.cancel(f"{SIM_BASE}/bfl/v1/get_result?id=x")
    assert (await stats(sim_http))["polls"] == 0


async def test_bfl_unknown_job_or_model_is_unavailable_like_any_404(
    sim_http: httpx.AsyncClient,
) -> None:
    adapter = provider("bfl", sim_http)
    with pytest.raises(UpstreamUnavailable, match="HTTP 404"):
        await adapter.poll(f"{SIM_BASE}/bfl/v1/get_result?id=nope")
    with pytest.raises(UpstreamUnavailable, match="HTTP 404"):
        await adapter.submit("flux-pro-9", request_for("flux-1-1-pro"))


# --- the unified adapter in front of a real Tollgate --------------------------------------------


async def test_unified_adapter_sits_in_front_of_another_tollgate(
    client: AsyncTestClient[Any], tenant_key: tuple[str, str], worker: None, simulator: Sim
) -> None:
    """Tollgate's own task object, results and cancel answer, read by the unified adapter."""
    _, key = tenant_key
    adapter = ADAPTERS["unified"](client, Endpoint(base_url=str(client.base_url), api_key=key))
    request = request_for("krea-2-medium", size="16:9", seed=12)
    submitted = await adapter.submit("krea-2-medium", request)
    assert submitted.job_id is not None
    assert submitted.job_id.startswith("task-unified-")
    state = await adapter.poll(submitted.job_id)
    for _ in range(200):
        if state.status in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(0.05)
        state = await adapter.poll(submitted.job_id)
    assert state.status == "completed", state
    [url] = state.urls
    image = await client.get(url)
    assert png_size(image.content) == (1344, 768)
    # The downstream task is final: its cancel answers a refusal (409), in our words.
    with pytest.raises(UpstreamRejected, match="cannot cancel"):
        await adapter.cancel(submitted.job_id)
    task = (await client.get(f"/v1/tasks/{submitted.job_id}", headers=bearer(key))).json()
    assert task["status"] == "completed"


# --- error mapping against canned answers -------------------------------------------------------

Answer = Callable[[httpx.Request], httpx.Response]


def echoing(status: int, **kwargs: Any) -> Answer:
    """An answer whose body repeats the URL and the key, as careless upstreams do."""

    def answer(request: httpx.Request) -> httpx.Response:
        key = request.headers.get("authorization") or request.headers.get("x-key")
        text = f"{request.method} {request.url} {key}"
        if "content" in kwargs or "json" in kwargs:
            return httpx.Response(status, **kwargs)
        body = {"error": text, "code": status * 100, "message": text}
        return httpx.Response(status, json=body, **kwargs)

    return answer


def raising(kind: type[httpx.TransportError]) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise kind(f"{kind.__name__} talking to {request.url}", request=request)

    return answer


BFL_POLLING_URL = f"{SECRET_BASE}/v1/get_result?id=job-1"
CALLS: dict[str, tuple[str, Callable[[Provider], Awaitable[Any]]]] = {
    "krea submit": ("krea", default_call("krea")),
    "krea poll": ("krea", lambda adapter: adapter.poll("job-1")),
    "krea cancel": ("krea", lambda adapter: adapter.cancel("job-1")),
    "siliconflow submit": ("siliconflow", default_call("siliconflow")),
    "unified submit": ("unified", default_call("unified")),
    "unified poll": ("unified", lambda adapter: adapter.poll("task-1")),
    "unified cancel": ("unified", lambda adapter: adapter.cancel("task-1")),
    "openai submit": ("openai", default_call("openai")),
    "bfl submit": ("bfl", default_call("bfl")),
    "bfl poll": ("bfl", lambda adapter: adapter.poll(BFL_POLLING_URL)),
}

FAILURES: dict[str, tuple[Answer, type[UpstreamError], float | None]] = {
    "500": (echoing(500), UpstreamUnavailable, None),
    "503": (echoing(503), UpstreamUnavailable, None),
    "429 with Retry-After": (
        echoing(429, headers={"Retry-After": "7"}),
        UpstreamUnavailable,
        7.0,
    ),
    "429 without Retry-After": (echoing(429), UpstreamUnavailable, None),
    "429 with a date as Retry-After": (
        echoing(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
        UpstreamUnavailable,
        None,
    ),
    "401": (echoing(401), UpstreamUnavailable, None),
    "403": (echoing(403), UpstreamUnavailable, None),
    "400": (echoing(400), UpstreamRejected, None),
    "404": (echoing(404), UpstreamUnavailable, None),
    "409": (echoing(409), UpstreamRejected, None),
    "422": (echoing(422), UpstreamRejected, None),
    "200 that is not JSON": (
        echoing(200, content=f"<html>{SECRET_BASE} {API_KEY}".encode()),
        UpstreamProtocolError,
        None,
    ),
    "200 with a JSON array": (
        echoing(200, json=[SECRET_BASE, API_KEY]),
        UpstreamProtocolError,
        None,
    ),
    "read timeout": (raising(httpx.ReadTimeout), UpstreamUnavailable, None),
    "connect timeout": (raising(httpx.ConnectTimeout), UpstreamUnavailable, None),
    "connect error": (raising(httpx.ConnectError), UpstreamUnavailable, None),
    "connection dropped": (raising(httpx.RemoteProtocolError), UpstreamUnavailable, None),
}


def assert_in_our_words(error: UpstreamError) -> None:
    for text in (error.message, str(error)):
        assert SECRET_HOST not in text
        assert API_KEY not in text
        assert "sim.test" not in text


@pytest.mark.parametrize("call", [call for call in CALLS if call != "unified cancel"])
@pytest.mark.parametrize("failure", FAILURES)
async def test_upstream_failure_maps_to_the_error_tree_without_url_or_key(
    call: str, failure: str
) -> None:
    name, make_call = CALLS[call]
    answer, error, retry_after = FAILURES[failure]
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        with pytest.raises(error) as raised:
            await make_call(provider(name, http, base=SECRET_BASE))
    assert type(raised.value) is error
    assert raised.value.retryable == (error is not UpstreamRejected)
    assert raised.value.retry_after == retry_after
    assert_in_our_words(raised.value)


@pytest.mark.parametrize(
    ("call", "body"),
    [
        ("krea submit", {"status": "queued"}),
        ("krea submit", {"job_id": ""}),
        ("krea poll", {"job_id": "job-1", "status": "exploded"}),
        ("krea poll", {"job_id": "job-1", "status": "completed"}),
        ("krea poll", {"job_id": "job-1", "status": "completed", "result": {"urls": []}}),
        ("krea poll", {"job_id": "job-1", "status": "completed", "result": {"urls": [1]}}),
        ("siliconflow submit", {"data": [{"url": "https://x/0.png"}]}),
        ("siliconflow submit", {"images": []}),
        ("siliconflow submit", {"images": [{"b64_json": "AAAA"}]}),
        ("siliconflow submit", {"images": ["https://x/0.png"]}),
        ("unified submit", {"status": "pending"}),
        ("unified submit", {"id": 7}),
        ("unified submit", {"id": "../../admin"}),
        ("unified submit", {"id": "task 1"}),
        ("unified poll", {"id": "task-1", "status": "exploded"}),
        ("unified poll", {"id": "task-1", "status": "completed"}),
        ("unified poll", {"id": "task-1", "status": "completed", "results": []}),
        ("unified poll", {"id": "task-1", "status": "completed", "results": [None]}),
        ("openai submit", {"images": [{"url": "https://x/0.png"}]}),
        ("openai submit", {"data": []}),
        ("openai submit", {"data": [{"revised_prompt": "x"}]}),
        ("openai submit", {"data": ["https://x/0.png"]}),
        ("openai submit", {"data": [{"b64_json": "not base64!"}]}),
        ("openai submit", {"data": [{"b64_json": ""}]}),
        ("bfl submit", {"status": "Pending"}),
        ("bfl submit", {"id": ""}),
        ("bfl submit", {"id": "job-1", "polling_url": 5}),
        ("bfl poll", {"id": "job-1", "status": "Exploded"}),
        ("bfl poll", {"id": "job-1", "status": "Ready"}),
        ("bfl poll", {"id": "job-1", "status": "Ready", "result": {"sample": ""}}),
        ("bfl poll", {"id": "job-1", "status": "Ready", "result": "https://x/0.png"}),
    ],
)
async def test_json_that_breaks_the_protocol_is_a_protocol_error(
    call: str, body: dict[str, Any]
) -> None:
    name, make_call = CALLS[call]
    async with httpx.AsyncClient(transport=httpx.MockTransport(echoing(200, json=body))) as http:
        with pytest.raises(UpstreamProtocolError) as raised:
            await make_call(provider(name, http, base=SECRET_BASE))
    assert_in_our_words(raised.value)


@pytest.mark.parametrize(
    ("call", "method", "path"),
    [
        ("krea submit", "POST", "/api/generate/image/krea/krea-2/medium"),
        ("krea poll", "GET", "/api/jobs/job-1"),
        ("krea cancel", "DELETE", "/api/jobs/job-1"),
        ("siliconflow submit", "POST", "/api/v1/images/generations"),
        ("unified submit", "POST", "/api/v1/images/generations"),
        ("unified poll", "GET", "/api/v1/tasks/task-1"),
        ("unified cancel", "POST", "/api/v1/tasks/task-1/cancel"),
        ("openai submit", "POST", "/api/v1/images/generations"),
        ("bfl submit", "POST", "/api/v1/flux-pro-1.1"),
        ("bfl poll", "GET", "/api/v1/get_result"),
    ],
)
async def test_calls_go_under_the_account_base_url_with_its_key(
    call: str, method: str, path: str
) -> None:
    name, make_call = CALLS[call]
    seen: list[httpx.Request] = []
    ok = {
        "job_id": "job-1",
        "id": "task-1",
        "polling_url": BFL_POLLING_URL,
        "status": "Pending" if name == "bfl" else "cancelled",
        "images": [{"url": "https://cdn.test/0.png"}],
        "data": [{"url": "https://cdn.test/0.png"}],
    }

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ok)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await make_call(provider(name, http, base=SECRET_BASE))
    [request] = seen
    assert (request.method, request.url.host, request.url.path) == (method, SECRET_HOST, path)
    if name == "bfl":
        assert request.headers["x-key"] == API_KEY
        assert "authorization" not in request.headers
    else:
        assert request.headers["authorization"] == f"Bearer {API_KEY}"


async def test_siliconflow_body_carries_the_resolved_request() -> None:
    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(200, json={"images": [{"url": "https://cdn.test/0.png"}]})

    request = request_for(
        "stable-diffusion-3-5-large",
        size="512x768",
        n=2,
        num_inference_steps=30,
        seed=77,
        prompt_enhancement=True,
        negative_prompt="boats",
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await provider("siliconflow", http, base=SECRET_BASE).submit(
            "stabilityai/stable-diffusion-3-5-large", request
        )
    assert json.loads(bodies[0]) == {
        "model": "stabilityai/stable-diffusion-3-5-large",
        "prompt": "a lighthouse at dusk",
        "image_size": "512x768",
        "batch_size": 2,
        "num_inference_steps": 30,
        "negative_prompt": "boats",
        "prompt_enhancement": True,
        "seed": 77,
    }


async def sent_body(name: str, upstream_model: str, request: ImageRequest) -> dict[str, Any]:
    """The JSON body ``name``'s adapter submits for ``request``."""
    bodies: list[dict[str, Any]] = []

    def answer(sent: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(sent.content))
        return httpx.Response(
            200, json={"id": "task-1", "polling_url": BFL_POLLING_URL, "data": [{"url": "u"}]}
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await provider(name, http, base=SECRET_BASE).submit(upstream_model, request)
    [body] = bodies
    return body


async def test_unified_body_is_the_request_in_the_unified_words_without_callback() -> None:
    request = request_for("krea-2-medium", size="4:5", seed=3, moodboards=["mb"])
    # A callback_url that reached the params by mistake still never leaves.
    request = ImageRequest(
        **{**request.to_json(), "params": {**request.params, "callback_url": "https://t.test/"}}
    )
    assert await sent_body("unified", "krea-2-medium", request) == {
        "model": "krea-2-medium",
        "prompt": "a lighthouse at dusk",
        "size": "4:5",
        "quality": "1K",
        "seed": 3,
        "nsfw_check": False,
        "creativity": "medium",
        "moodboards": ["mb"],
        "intensity": 0,
        "complexity": 0,
        "movement": 0,
    }
    wxh = await sent_body("unified", "flux-1-dev", request_for("flux-1-dev", size="512x256", n=2))
    assert wxh["size"] == "512x256"
    assert "quality" not in wxh
    assert (wxh["n"], wxh["num_inference_steps"]) == (2, 20)


async def test_openai_body_asks_for_the_catalogue_pixels_and_quality_only() -> None:
    request = request_for("chatgpt-image", size="3:2", quality="low")
    # No response_format: GPT image models refuse it, and both answers are read.
    assert await sent_body("openai", "gpt-image-1", request) == {
        "model": "gpt-image-1",
        "prompt": "a lighthouse at dusk",
        "n": 2,
        "size": "1536x1024",
        "quality": "low",
    }


@pytest.mark.parametrize(
    ("model_id", "fields", "expected"),
    [
        (
            "flux-1-1-pro",
            {"size": "16:9", "seed": 9, "prompt_enhancement": True, "nsfw_check": True},
            {
                "width": 1344,
                "height": 768,
                "seed": 9,
                "prompt_upsampling": True,
                "safety_tolerance": 0,
            },
        ),
        (
            "flux-1-1-pro-ultra",
            {"size": "21:9", "seed": 0},
            {"aspect_ratio": "21:9", "prompt_upsampling": False},
        ),
    ],
)
async def test_bfl_body_sends_the_size_in_the_form_the_catalogue_names(
    model_id: str, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    body = await sent_body("bfl", entry(model_id).upstream_model, request_for(model_id, **fields))
    assert body == {"prompt": "a lighthouse at dusk", "output_format": "png", **expected}


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        ({"status": "Pending", "progress": 0.4}, "processing", None),
        ({"status": "Error"}, "failed", "the upstream could not generate the image"),
        ({"status": "Failed"}, "failed", "the upstream could not generate the image"),
        ({"status": "Request Moderated"}, "failed", "the upstream's moderation refused the prompt"),
        ({"status": "Content Moderated"}, "failed", "the upstream's moderation withheld the image"),
    ],
)
async def test_bfl_statuses_map_to_job_states_in_our_words(
    answer: dict[str, Any], status: str, error: str | None
) -> None:
    body = {"id": "job-1", "result": None, "details": {"raw": SECRET_BASE}, **answer}
    async with httpx.AsyncClient(transport=httpx.MockTransport(echoing(200, json=body))) as http:
        state = await provider("bfl", http, base=SECRET_BASE).poll(BFL_POLLING_URL)
    assert (state.status, state.error) == (status, error)


async def test_bfl_task_not_found_is_unavailable_as_a_404_would_be() -> None:
    body = {"id": "job-1", "status": "Task not found"}
    async with httpx.AsyncClient(transport=httpx.MockTransport(echoing(200, json=body))) as http:
        with pytest.raises(UpstreamUnavailable, match="no longer knows the job") as raised:
            await provider("bfl", http, base=SECRET_BASE).poll(BFL_POLLING_URL)
    assert_in_our_words(raised.value)


async def test_bfl_ready_job_gives_its_sample_link() -> None:
    body = {"id": "job-1", "status": "Ready", "result": {"sample": "https://cdn.test/s.png"}}
    async with httpx.AsyncClient(transport=httpx.MockTransport(echoing(200, json=body))) as http:
        state = await provider("bfl", http, base=SECRET_BASE).poll(BFL_POLLING_URL)
    assert (state.status, state.urls) == ("completed", ("https://cdn.test/s.png",))


@pytest.mark.parametrize(
    "polling_url",
    [
        "https://evil.example/v1/get_result?id=job-1",
        f"http://{SECRET_HOST}:8443/api/v1/get_result?id=job-1",  # another scheme
        f"https://{SECRET_HOST}/api/v1/get_result?id=job-1",  # another port
        f"https://{SECRET_HOST}.evil.example:8443/v1/get_result?id=job-1",
        f"https://{SECRET_HOST}:8443@evil.example/v1/get_result?id=job-1",
        "/v1/get_result?id=job-1",
        "",
    ],
)
async def test_bfl_polling_url_off_the_channel_host_is_refused_and_never_called(
    polling_url: str,
) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "job-1", "polling_url": polling_url})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        adapter = provider("bfl", http, base=SECRET_BASE)
        with pytest.raises(UpstreamBadResult) as at_submit:
            await adapter.submit("flux-pro-1.1", request_for("flux-1-1-pro"))
        with pytest.raises(UpstreamBadResult) as at_poll:
            await adapter.poll(polling_url)
    # Only the submit went out: the key never travels to another host.
    assert [request.url.path for request in seen] == ["/api/v1/flux-pro-1.1"]
    for raised in (at_submit, at_poll):
        # Not the request's fault: routing tries another channel, never this one again.
        assert not raised.value.retryable
        assert raised.value.try_elsewhere
        assert_in_our_words(raised.value)
        assert "evil" not in raised.value.message


async def test_bfl_answer_without_polling_url_is_polled_on_the_base_url() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": "job/1"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        submitted = await provider("bfl", http, base=SECRET_BASE).submit(
            "flux-pro-1.1", request_for("flux-1-1-pro")
        )
    assert submitted.job_id == f"{SECRET_BASE}/v1/get_result?id=job%2F1"


@pytest.mark.parametrize(
    ("answer", "error", "retry_after"),
    [
        # No cancel route (404, 405), or a task already final (409): it cannot cancel.
        (echoing(404), UpstreamRejected, None),
        (echoing(405), UpstreamRejected, None),
        (echoing(409), UpstreamRejected, None),
        (echoing(400), UpstreamRejected, None),
        (echoing(429, headers={"Retry-After": "7"}), UpstreamUnavailable, 7.0),
        (echoing(500), UpstreamUnavailable, None),
        (echoing(401), UpstreamUnavailable, None),
        (raising(httpx.ReadTimeout), UpstreamUnavailable, None),
        (raising(httpx.ConnectError), UpstreamUnavailable, None),
    ],
)
async def test_unified_cancel_maps_its_answers_in_our_words(
    answer: Answer, error: type[UpstreamError], retry_after: float | None
) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        with pytest.raises(error) as raised:
            await provider("unified", http, base=SECRET_BASE).cancel("task-1")
    assert type(raised.value) is error
    assert raised.value.retry_after == retry_after
    assert_in_our_words(raised.value)
    if error is UpstreamRejected:
        assert "cannot cancel" in raised.value.message or "refused" in raised.value.message


@pytest.mark.parametrize("body", [b"", b"<html>ok</html>", b'{"status": "cancelled"}'])
async def test_unified_cancel_accepted_whatever_the_body(body: bytes) -> None:
    answer = echoing(200, content=body)
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await provider("unified", http, base=SECRET_BASE).cancel("task-1")


async def test_unified_task_id_is_escaped_in_the_path() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "pending"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await provider("unified", http, base=SECRET_BASE).poll("a/../b")
    assert seen[0].url.raw_path == b"/api/v1/tasks/a%2F..%2Fb"
