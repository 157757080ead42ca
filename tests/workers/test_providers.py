"""The Krea and SiliconFlow adapters: every catalogue model against the simulator in-process,
and the error tree against canned upstream answers (``httpx.MockTransport``)."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from pricing.catalog import ModelEntry, load_catalog
from pricing.request import ImageRequest, resolve_request
from workers.providers import ADAPTERS
from workers.providers.base import (
    Endpoint,
    JobState,
    Provider,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from workers.simulator.app import SimulatorConfig, create_simulator_app
from workers.simulator.png import png_size
from workers.simulator.sizes import image_size

API_KEY = "sk-adapter-test-5f0c1e9a"
SIM_BASE = "http://sim.test"
# Where the canned answers pretend to live: neither may ever show up in an error message.
SECRET_HOST = "upstream-7c2e.internal"
SECRET_BASE = f"https://{SECRET_HOST}:8443/api"
CATALOG = load_catalog()
KREA_MODEL = "krea/krea-2/medium"
SCHNELL = "black-forest-labs/FLUX.1-schnell"


def entry(model_id: str) -> ModelEntry:
    found = CATALOG.model(model_id)
    assert found is not None, model_id
    return found


def provider(name: str, http: httpx.AsyncClient, *, base: str = SIM_BASE) -> Provider:
    return ADAPTERS[name](http, Endpoint(base_url=base, api_key=API_KEY))


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
    response = await http.post("/_sim/config", json=knobs)
    assert response.status_code == 200, response.text


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


async def image_sizes(http: httpx.AsyncClient, urls: tuple[str, ...]) -> list[tuple[int, int]]:
    sizes = []
    for url in urls:
        response = await http.get(url)
        assert response.status_code == 200, url
        sizes.append(png_size(response.content))
    return sizes


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
    sizes = await image_sizes(sim_http, state.urls)
    assert sizes == [(request.width, request.height)] * request.images


@pytest.mark.parametrize(
    "model", [m for m in CATALOG.models if m.provider == "krea"], ids=lambda model: model.id
)
def test_krea_catalogue_sizes_are_the_upstream_pixel_sizes(model: ModelEntry) -> None:
    assert model.sizes is not None
    for size, by_quality in model.sizes.items():
        for quality, pixels in by_quality.items():
            assert image_size(size, quality) == pixels, (size, quality)


async def test_krea_request_with_size_quality_and_seed_completes_at_its_size(
    sim_http: httpx.AsyncClient,
) -> None:
    request = request_for("krea-1", size="16:9", quality="2K", seed=42)
    state = await generate(provider("krea", sim_http), "krea/krea-1", request)
    assert await image_sizes(sim_http, state.urls) == [(2688, 1472)] * 4


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
    sizes = await image_sizes(sim_http, state.urls)
    assert sizes == [(request.width, request.height)] * fields["n"]


# --- adapters against the simulator's faults ----------------------------------------------------


def default_call(name: str) -> Callable[[Provider], Awaitable[Any]]:
    if name == "krea":
        return lambda adapter: adapter.submit(KREA_MODEL, request_for("krea-2-medium"))
    return lambda adapter: adapter.submit(SCHNELL, request_for("flux-1-schnell"))


@pytest.mark.parametrize("name", ["krea", "siliconflow"])
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


@pytest.mark.parametrize("name", ["krea", "siliconflow"])
async def test_wrong_api_key_is_unavailable_not_the_requests_fault(
    sim_http: httpx.AsyncClient, name: str
) -> None:
    account = Endpoint(base_url=SIM_BASE, api_key="sk-wrong")
    with pytest.raises(UpstreamUnavailable, match="credentials"):
        await default_call(name)(ADAPTERS[name](sim_http, account))


async def test_krea_failed_job_polls_as_failed_in_our_words(sim_http: httpx.AsyncClient) -> None:
    await configure(sim_http, error_kind="job_failed")
    state = await generate(provider("krea", sim_http), KREA_MODEL, request_for("krea-2-medium"))
    assert state.status == "failed"
    assert state.urls == ()
    assert state.error == "the upstream could not generate the image"


async def test_siliconflow_failed_generation_is_an_upstream_error(
    sim_http: httpx.AsyncClient,
) -> None:
    await configure(sim_http, error_kind="job_failed")
    with pytest.raises(UpstreamUnavailable):
        await provider("siliconflow", sim_http).submit(SCHNELL, request_for("flux-1-schnell"))


@pytest.mark.parametrize(
    ("name", "upstream_model", "model_id", "changes"),
    [
        # Requests the catalogue would refuse, so the upstream's 400 is reached.
        ("krea", KREA_MODEL, "krea-2-medium", {"size": "7:3"}),
        ("siliconflow", SCHNELL, "flux-1-schnell", {"width": 8192, "height": 1024}),
        ("siliconflow", SCHNELL, "flux-1-schnell", {"images": 5}),
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


async def test_krea_cancel_stops_an_active_job_and_refuses_a_final_one(
    sim_http: httpx.AsyncClient,
) -> None:
    await configure(sim_http, latency=5)
    adapter = provider("krea", sim_http)
    submitted = await adapter.submit(KREA_MODEL, request_for("krea-2-medium"))
    assert submitted.job_id is not None
    assert (await adapter.poll(submitted.job_id)).status == "pending"
    await adapter.cancel(submitted.job_id)
    assert (await adapter.poll(submitted.job_id)).status == "cancelled"
    with pytest.raises(UpstreamRejected):
        await adapter.cancel(submitted.job_id)


async def test_siliconflow_has_no_job_to_poll_or_cancel(sim_http: httpx.AsyncClient) -> None:
    adapter = provider("siliconflow", sim_http)
    with pytest.raises(UpstreamRejected):
        await adapter.poll("anything")
    with pytest.raises(UpstreamRejected):
        await adapter.cancel("anything")
    assert (await sim_http.get("/_sim/stats")).json()["submits"] == 0


# --- error mapping against canned answers -------------------------------------------------------

Answer = Callable[[httpx.Request], httpx.Response]


def echoing(status: int, **kwargs: Any) -> Answer:
    """An answer whose body repeats the URL and the key, as careless upstreams do."""

    def answer(request: httpx.Request) -> httpx.Response:
        text = f"{request.method} {request.url} {request.headers.get('authorization')}"
        if "content" in kwargs or "json" in kwargs:
            return httpx.Response(status, **kwargs)
        body = {"error": text, "code": status * 100, "message": text}
        return httpx.Response(status, json=body, **kwargs)

    return answer


def raising(kind: type[httpx.TransportError]) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise kind(f"{kind.__name__} talking to {request.url}", request=request)

    return answer


CALLS: dict[str, tuple[str, Callable[[Provider], Awaitable[Any]]]] = {
    "krea submit": ("krea", default_call("krea")),
    "krea poll": ("krea", lambda adapter: adapter.poll("job-1")),
    "krea cancel": ("krea", lambda adapter: adapter.cancel("job-1")),
    "siliconflow submit": ("siliconflow", default_call("siliconflow")),
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
    "404": (echoing(404), UpstreamRejected, None),
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


@pytest.mark.parametrize("call", CALLS)
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
    ],
)
async def test_calls_go_under_the_account_base_url_with_its_bearer_key(
    call: str, method: str, path: str
) -> None:
    seen: list[httpx.Request] = []
    ok = {
        "job_id": "job-1",
        "status": "cancelled",
        "images": [{"url": "https://cdn.test/0.png"}],
    }

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ok)

    name, make_call = CALLS[call]
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await make_call(provider(name, http, base=SECRET_BASE))
    [request] = seen
    assert (request.method, request.url.host, request.url.path) == (method, SECRET_HOST, path)
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
