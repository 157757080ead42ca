"""The provider adapters against the simulator's faults, and each protocol's own behaviour."""

import asyncio
import tracemalloc
from typing import Any

import httpx
import pytest
from conftest import SIM_KEY, Sim
from provider_calls import (
    BASES,
    DEFAULTS,
    KREA_MODEL,
    MAX_IMAGE_BYTES,
    NAMES,
    PREFIXES,
    SCHNELL,
    SIM_BASE,
    assert_in_our_words,
    configure,
    default_call,
    default_state,
    generate,
    image_sizes,
    provider,
    request_for,
    result_bytes,
    stats,
)

from pricing.request import ImageRequest
from workers.images import image_of
from workers.providers import ADAPTERS
from workers.providers.base import (
    Endpoint,
    UpstreamBadResult,
    UpstreamCredentialsRefused,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from workers.simulator.png import png_size


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


@pytest.mark.parametrize("name", NAMES)
async def test_an_html_400_fails_over_and_its_connection_is_not_reused(
    simulator: Sim, name: str
) -> None:
    """A load balancer's "Bad request syntax" page is the channel's fault, not the request's;
    and the connection it came on is dropped, not handed to the next call."""
    await simulator.configure(latency=0.0)
    async with httpx.AsyncClient() as http:
        adapter = ADAPTERS[name](http, Endpoint(simulator.url + PREFIXES[name], SIM_KEY))
        await default_call(name)(adapter)
        assert (await simulator.stats())["connections"] == 1  # pooled and reused so far
        await simulator.configure(error_kind="html_400")
        with pytest.raises(UpstreamUnavailable, match="HTTP 400 outside its protocol") as raised:
            await default_call(name)(adapter)
        assert raised.value.retryable
        assert not isinstance(raised.value, UpstreamRejected)
        await simulator.configure(error_kind="none")
        await default_call(name)(adapter)
    assert (await simulator.stats())["connections"] == 2


@pytest.mark.parametrize("name", NAMES)
async def test_a_403_is_the_channels_credentials_and_opens_its_circuit(
    simulator: Sim, name: str
) -> None:
    await simulator.configure(error_kind="submit_403")
    async with httpx.AsyncClient() as http:
        adapter = ADAPTERS[name](http, Endpoint(simulator.url + PREFIXES[name], SIM_KEY))
        with pytest.raises(UpstreamCredentialsRefused, match=r"credentials \(HTTP 403\)") as raised:
            await default_call(name)(adapter)
    assert raised.value.opens_circuit
    assert raised.value.retryable


@pytest.mark.parametrize("name", NAMES)
async def test_huge_answers_are_refused_at_the_cap_without_being_read_whole(
    simulator: Sim, name: str
) -> None:
    """Five concurrent 64 MiB answers: each refused once past its cap, memory stays flat."""
    await simulator.configure(error_kind="huge_body", huge_body_bytes=64 * 1024 * 1024)
    # For OpenAI's inline images the cap grows with the image cap: keep that small here.
    endpoint = Endpoint(
        simulator.url + PREFIXES[name], SIM_KEY, submit_timeout=60, max_image_bytes=1024 * 1024
    )
    tracemalloc.start()
    try:
        async with httpx.AsyncClient() as http:
            adapter = ADAPTERS[name](http, endpoint)
            outcomes = await asyncio.gather(
                *(default_call(name)(adapter) for _ in range(5)), return_exceptions=True
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for outcome in outcomes:
        assert isinstance(outcome, UpstreamProtocolError), outcome
        assert outcome.code == "upstream_bad_response"
        assert "larger than" in outcome.message
    assert peak < 24 * 1024 * 1024, f"peak {peak} bytes"


def test_the_inline_image_cap_allows_n_base64_images_of_the_image_cap() -> None:
    endpoint = Endpoint("https://x", "k", max_body_bytes=1000, max_image_bytes=3000)
    assert endpoint.inline_images_cap(1) == 1000 + 4000
    assert endpoint.inline_images_cap(4) == 1000 + 16_000
