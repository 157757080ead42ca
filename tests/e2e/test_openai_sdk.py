"""The official ``openai`` package, sync and async, against ``/openai/v1`` of a running
gateway (uvicorn on a loopback port), a real worker, the simulator as upstream, and
real PostgreSQL and Redis.

The sync client runs in a thread: the gateway and the worker share this test's loop.
"""

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import (
    Sim,
    bearer,
    make_settings,
    make_tenant_key,
    rows_of,
    scalar,
    serve_app,
    start_worker,
    stop_worker,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.settings import Settings

pytestmark = pytest.mark.timeout(90)

PNG = b"\x89PNG\r\n\x1a\n"


@contextlib.asynccontextmanager
async def running(settings: Settings, *, worker: bool = True) -> AsyncIterator[str]:
    """A gateway (and a worker) on ``settings``: the gateway's base URL."""
    async with serve_app(settings) as url:
        if not worker:
            yield url
            return
        arq_worker, task = start_worker(settings)
        try:
            yield url
        finally:
            await stop_worker(arq_worker, task)


@pytest.fixture
async def gateway(settings: Settings, simulator: Sim) -> AsyncIterator[str]:
    async with running(settings) as url:
        yield url


def sync_client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/openai/v1", api_key=key, max_retries=0, timeout=60)


def async_client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=key, max_retries=0, timeout=60)


async def task_of(url: str, key: str, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
        response = await http.get(f"/v1/tasks/{task_id}", headers=bearer(key))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


async def download(url: str) -> bytes:
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(url)
        assert response.status_code == 200, response.text
        return response.content


async def test_sync_client_gets_signed_urls_and_the_task_in_headers(
    gateway: str, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key

    def generate() -> Any:
        with sync_client(gateway, key) as client:
            return client.images.with_raw_response.generate(
                model="flux-1-schnell", prompt="a lighthouse at dawn", size="1024x1024", n=1
            )

    raw = await asyncio.to_thread(generate)
    images = raw.parse()
    assert images.data is not None
    assert len(images.data) == 1
    url = images.data[0].url
    assert url is not None
    assert url.startswith("http://testserver.local/v1/files/")
    assert images.size == "1024x1024"
    task_id = raw.headers["X-Tollgate-Task-Id"]
    task = await task_of(gateway, key, task_id)
    assert task["status"] == "completed"
    assert task["results"] == [url]
    assert raw.headers["X-Tollgate-Credits-Charged"] == str(task["usage"]["credits_charged"])
    # The link is this gateway's own, and serves the image.
    path = url.removeprefix("http://testserver.local")
    assert (await download(f"{gateway}{path}")).startswith(PNG)


async def test_async_client_gets_b64_json_and_several_images(
    gateway: str, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    async with async_client(gateway, key) as client:
        images = await client.images.generate(
            model="flux-1-schnell",
            prompt="two lighthouses",
            size="512x512",
            n=2,
            response_format="b64_json",
        )
    assert images.data is not None
    assert len(images.data) == 2
    for image in images.data:
        assert image.url is None
        assert image.b64_json is not None
        assert base64.b64decode(image.b64_json).startswith(PNG)


async def test_a_pixel_size_maps_to_the_nearest_aspect_and_quality(
    gateway: str, tenant_key: tuple[str, str], engine: AsyncEngine
) -> None:
    _, key = tenant_key
    async with async_client(gateway, key) as client:
        raw = await client.images.with_raw_response.generate(
            model="krea-2-turbo", prompt="a wide harbour", size="1792x1024"
        )
    images = raw.parse()
    assert images.data is not None
    assert len(images.data) == 4  # what krea-2-turbo makes
    assert images.size == "1344x768"
    task_id = raw.headers["X-Tollgate-Task-Id"]
    stored = await scalar(engine, "SELECT request FROM tasks WHERE id = :id", id=task_id)
    assert (stored["size"], stored["quality"]) == ("16:9", "1K")


async def test_n_on_a_fixed_count_model_must_be_what_it_makes(
    gateway: str, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    async with async_client(gateway, key) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.generate(model="krea-2-turbo", prompt="one image", n=1)
    assert caught.value.status_code == 400
    assert caught.value.param == "n"
    assert "makes 4 images per generation" in caught.value.message


async def test_a_bad_field_is_a_bad_request_naming_it(
    gateway: str, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key

    def generate() -> Any:
        with sync_client(gateway, key) as client:
            return client.images.generate(model="flux-1-schnell", prompt="x", size="huge")

    with pytest.raises(openai.BadRequestError) as caught:
        await asyncio.to_thread(generate)
    assert caught.value.param == "size"
    assert caught.value.code == "invalid_request"
    async with async_client(gateway, key) as client:
        with pytest.raises(openai.BadRequestError) as unknown:
            await client.images.generate(
                model="flux-1-schnell", prompt="x", extra_body={"colour": "red"}
            )
        assert unknown.value.param == "colour"
        with pytest.raises(openai.BadRequestError) as model:
            await client.images.generate(model="dall-e-9", prompt="x")
        assert model.value.param == "model"


async def test_a_wrong_key_raises_authentication_error(gateway: str) -> None:
    async with async_client(gateway, "tg_not_a_key") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.images.generate(model="flux-1-schnell", prompt="x")
        assert caught.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


async def test_no_credits_raises_rate_limit_error_insufficient_quota_and_records_nothing(
    gateway: str, settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings, credits_micros=0)
    async with async_client(gateway, key) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.images.generate(model="flux-1-schnell", prompt="x")
    assert caught.value.status_code == 429
    assert caught.value.code == "insufficient_quota"
    assert caught.value.type == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert (await rows_of(engine, tenant_id))["tasks"] == 0


async def test_a_rate_limited_key_raises_rate_limit_error(
    gateway: str, tenant_key: tuple[str, str], engine: AsyncEngine
) -> None:
    tenant_id, key = tenant_key
    async with engine.begin() as conn:
        from sqlalchemy import text

        await conn.execute(
            text(
                "UPDATE api_keys SET rate_limit_per_minute = 1, rate_limit_burst = 1 "
                "WHERE tenant_id = :t"
            ),
            {"t": tenant_id},
        )
    await asyncio.sleep(1.2)  # the key cache's lifetime in tests
    async with async_client(gateway, key) as client:
        await client.models.list()
        with pytest.raises(openai.RateLimitError) as caught:
            await client.models.list()
    assert caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["Retry-After"]) >= 1


async def test_models_list_is_openais_list_shape(gateway: str, tenant_key: tuple[str, str]) -> None:
    _, key = tenant_key

    def list_models() -> list[Any]:
        with sync_client(gateway, key) as client:
            return list(client.models.list())

    models = await asyncio.to_thread(list_models)
    ids = {model.id for model in models}
    assert {"flux-1-schnell", "krea-2-turbo", "chatgpt-image"} <= ids
    for model in models:
        assert model.object == "model"
        assert isinstance(model.created, int)
        assert model.owned_by in {"krea", "siliconflow", "openai", "bfl"}


async def test_an_idempotency_key_retry_answers_the_same_task_charged_once(
    gateway: str, tenant_key: tuple[str, str], engine: AsyncEngine
) -> None:
    tenant_id, key = tenant_key
    headers = {"Idempotency-Key": f"idem-{uuid.uuid4().hex}"}
    async with async_client(gateway, key) as client:
        first = await client.images.with_raw_response.generate(
            model="flux-1-schnell", prompt="once", extra_headers=headers
        )
        again = await client.images.with_raw_response.generate(
            model="flux-1-schnell", prompt="once", extra_headers=headers
        )
    assert first.headers["X-Tollgate-Task-Id"] == again.headers["X-Tollgate-Task-Id"]
    assert first.parse().data == again.parse().data
    rows = await rows_of(engine, tenant_id)
    assert rows["tasks"] == 1
    assert rows["capture"] == 1


# --- When the wait runs out, or the client leaves ------------------------------------


@pytest.fixture
def short_wait(database_url: str, simulator_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, simulator_url, tmp_path / "storage", openai_wait_seconds=1)


async def test_a_cancellable_task_past_the_wait_is_cancelled_and_released(
    short_wait: Settings, simulator: Sim, engine: AsyncEngine
) -> None:
    await simulator.configure(latency=8)
    tenant_id, key = await make_tenant_key(short_wait)
    async with running(short_wait) as url, async_client(url, key) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.images.generate(model="krea-2-medium", prompt="slow")
    assert caught.value.status_code == 504
    assert caught.value.code == "timeout"
    assert "was cancelled and nothing was charged" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"
    task_id = caught.value.response.headers["X-Tollgate-Task-Id"]
    assert task_id in caught.value.message
    status = await scalar(engine, "SELECT status FROM tasks WHERE id = :id", id=task_id)
    assert status == "cancelled"
    held = await scalar(engine, "SELECT held_micros FROM tenants WHERE id = :id", id=tenant_id)
    assert held == 0


async def test_a_task_that_cannot_be_cancelled_runs_on_and_the_error_names_it(
    short_wait: Settings, simulator: Sim
) -> None:
    await simulator.configure(latency=2.5)
    _, key = await make_tenant_key(short_wait)
    async with running(short_wait) as url:
        async with async_client(url, key) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                # flux-1-schnell's upstream is synchronous: once running it cannot stop.
                await client.images.generate(model="flux-1-schnell", prompt="slow")
        task_id = caught.value.response.headers["X-Tollgate-Task-Id"]
        assert f"GET /v1/tasks/{task_id}" in caught.value.message
        assert "will be charged" in caught.value.message
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
            response = await http.get(
                f"/v1/tasks/{task_id}", headers={**bearer(key), "Prefer": "wait=20"}
            )
        task = response.json()
        assert task["status"] == "completed"
        assert task["usage"]["credits_charged"] > 0


async def test_a_client_that_leaves_gets_its_cancellable_task_cancelled(
    settings: Settings, simulator: Sim, engine: AsyncEngine
) -> None:
    await simulator.configure(latency=8)
    tenant_id, key = await make_tenant_key(settings)
    async with running(settings) as url:
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
            waiting = asyncio.create_task(
                http.post(
                    "/openai/v1/images/generations",
                    json={"model": "krea-2-medium", "prompt": "I will not wait"},
                    headers=bearer(key),
                    timeout=60,
                )
            )
            # The client leaves once its task exists (however loaded the machine is).
            deadline = time.monotonic() + 30
            while not await scalar(
                engine, "SELECT count(*) FROM tasks WHERE tenant_id = :t", t=tenant_id
            ):
                assert time.monotonic() < deadline, "no task recorded"
                assert not waiting.done(), waiting
                await asyncio.sleep(0.05)
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        deadline = time.monotonic() + 10
        while True:
            status = await scalar(
                engine, "SELECT status FROM tasks WHERE tenant_id = :t", t=tenant_id
            )
            if status == "cancelled":
                break
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)
    held = await scalar(engine, "SELECT held_micros FROM tenants WHERE id = :id", id=tenant_id)
    assert held == 0
