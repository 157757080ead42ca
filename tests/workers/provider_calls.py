"""Calls to the provider adapters, against the in-process simulator (``sim_http``) or canned
answers, for their tests."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from conftest import INPROCESS_SIM_BASE, INPROCESS_SIM_KEY

from pricing.catalog import ModelEntry, load_catalog
from pricing.request import ImageRequest, resolve_request
from workers.providers import ADAPTERS
from workers.providers.base import Endpoint, JobState, Provider, UpstreamError
from workers.simulator.png import png_size

API_KEY = INPROCESS_SIM_KEY
SIM_BASE = INPROCESS_SIM_BASE
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
    name: str, http: httpx.AsyncClient, *, base: str | None = None, **limits: Any
) -> Provider:
    endpoint = Endpoint(base_url=base or BASES[name], api_key=API_KEY, **limits)
    return ADAPTERS[name](http, endpoint)


def request_for(model_id: str, **fields: Any) -> ImageRequest:
    return resolve_request(entry(model_id), {"prompt": "a lighthouse at dusk", **fields})


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


def assert_in_our_words(error: UpstreamError) -> None:
    for text in (error.message, str(error)):
        assert SECRET_HOST not in text
        assert API_KEY not in text
        assert "sim.test" not in text
