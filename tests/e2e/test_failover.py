"""A model served by two channels: tasks keep completing while the first fails in every way.

Two simulator processes stand for two upstream accounts. The primary channel
(priority 10) lives in the channels table; the fallback is the environment's
``env:krea`` channel (priority 0) on the session's simulator. Real gateway,
real worker, real PostgreSQL and Redis.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SIM_KEY,
    Sim,
    bearer,
    make_settings,
    make_tenant_key,
    scalar,
    simulator_process,
    start_worker,
    stop_worker,
    wait_for_status,
)
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.channels import service as channels
from gateway.db import session_factory, transaction
from gateway.settings import Settings
from pricing.catalog import load_catalog

Client = AsyncTestClient[Any]
MODEL = "krea-2-medium"


@pytest.fixture(scope="module")
def primary_url() -> Iterator[str]:
    with simulator_process() as url:
        yield url


@pytest.fixture
async def primary(primary_url: str) -> AsyncIterator[Sim]:
    sim = Sim(primary_url)
    await sim.reset()
    yield sim
    await sim.reset()


def failover_settings(
    database_url: str, simulator_url: str, storage: Path, **extra: Any
) -> Settings:
    values: dict[str, Any] = {
        "upstream_timeout_seconds": 1.0,
        "upstream_poll_timeout_seconds": 1.0,
        "upstream_retry_base_seconds": 0.1,
        "channel_cache_ttl_seconds": 0.0,
        "circuit_failure_threshold": 2,
        "circuit_cooldown_seconds": 2.0,
    }
    values.update(extra)
    return make_settings(database_url, simulator_url, storage, **values)


@pytest.fixture
def settings(database_url: str, simulator_url: str, tmp_path: Path) -> Settings:
    return failover_settings(database_url, simulator_url, tmp_path / "storage")


@pytest.fixture
async def primary_channel(
    settings: Settings, engine: AsyncEngine, primary_url: str
) -> AsyncIterator[str]:
    """The primary channel for MODEL on the second simulator; removed afterwards."""
    name = f"primary-{uuid.uuid4().hex[:8]}"
    fields = {
        "name": name,
        "adapter": "krea",
        "base_url": primary_url,
        "api_key": SIM_KEY,
        "models": {MODEL: None},
        "priority": 10,
    }
    async with transaction(session_factory(engine)) as session:
        await channels.create_channel(session, fields, load_catalog())
    yield name
    async with transaction(session_factory(engine)) as session:
        await channels.delete_channel(session, name)


async def submit(client: Client, key: str, prompt: str) -> str:
    response = await client.post(
        "/v1/images/generations", json={"model": MODEL, "prompt": prompt}, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    task_id: str = response.json()["id"]
    return task_id


async def run_tasks(settings: Settings, count: int, prompt: str) -> list[dict[str, Any]]:
    """Submit ``count`` tasks one after another through a real worker; their final states."""
    _, key = await make_tenant_key(settings)
    worker, running = start_worker(settings)
    try:
        async with AsyncTestClient(
            app=create_app(settings), base_url="http://testserver.local"
        ) as client:
            done = []
            for i in range(count):
                task_id = await submit(client, key, f"{prompt} {i}")
                done.append(
                    await wait_for_status(client, key, task_id, {"completed", "failed"}, wait=30)
                )
            return done
    finally:
        await stop_worker(worker, running)


async def channel_of(engine: AsyncEngine, task_id: str) -> str:
    value: str = await scalar(engine, "SELECT channel_id FROM tasks WHERE id = :id", id=task_id)
    return value


FAILURES = {
    "500s": {"error_kind": "submit_500"},
    "a hang past the submit time limit": {"error_kind": "hang", "hang_seconds": 5},
    "malformed bodies": {"error_kind": "malformed"},
    "429s": {"error_kind": "submit_429", "retry_after": 30},
    "failed jobs": {"error_kind": "job_failed"},
    "bodies that are not images": {"error_kind": "bad_image"},
    "every request failing": {"failure_rate": 1.0},
    # A load balancer's page is the channel's fault, not the request's.
    "HTML 400 pages": {"error_kind": "html_400"},
    "403s (the channel's key refused)": {"error_kind": "submit_403"},
    "redirects": {"error_kind": "redirect"},
    "bodies past the cap": {"error_kind": "huge_body", "huge_body_bytes": 8_000_000},
    "images of the wrong size": {"error_kind": "wrong_size"},
}


@pytest.mark.usefixtures("primary_channel")
@pytest.mark.parametrize("knobs", FAILURES.values(), ids=FAILURES.keys())
async def test_tasks_keep_completing_while_the_primary_fails(
    settings: Settings,
    engine: AsyncEngine,
    primary: Sim,
    simulator: Sim,
    knobs: dict[str, Any],
) -> None:
    await primary.configure(latency=0.2, **knobs)
    done = await run_tasks(settings, 3, "failover")
    assert [t["status"] for t in done] == ["completed"] * 3, done
    # Every result came from the fallback, and the primary was asked first
    # ("submits" counts requests, failed ones included).
    assert (await simulator.stats())["submits"] == 3
    assert (await primary.stats())["submits"] >= 1
    for task in done:
        assert await channel_of(engine, task["id"]) == "env:krea"


async def test_a_healthy_primary_serves_and_the_fallback_stays_idle(
    settings: Settings, engine: AsyncEngine, primary: Sim, simulator: Sim, primary_channel: str
) -> None:
    done = await run_tasks(settings, 2, "healthy")
    assert [t["status"] for t in done] == ["completed"] * 2
    assert (await primary.stats())["submits"] == 2
    assert (await simulator.stats())["submits"] == 0
    channel_id = await channel_of(engine, done[0]["id"])
    assert channel_id.startswith("ch_")


@pytest.mark.usefixtures("primary_channel")
async def test_the_circuit_opens_after_the_threshold_and_closes_after_a_good_probe(
    settings: Settings, engine: AsyncEngine, primary: Sim, simulator: Sim
) -> None:
    await primary.configure(error_kind="submit_500")
    done = await run_tasks(settings, 4, "circuit")
    assert [t["status"] for t in done] == ["completed"] * 4
    # Two failures open the circuit (threshold 2): later tasks skip the primary entirely.
    assert (await primary.stats())["submits"] == 2
    await primary.configure(error_kind="none")
    await asyncio.sleep(settings.circuit_cooldown_seconds + 0.2)
    done = await run_tasks(settings, 2, "closed again")
    assert [t["status"] for t in done] == ["completed"] * 2
    # The first task after the cool-down probed the primary and closed the circuit.
    assert (await primary.stats())["submits"] == 4
    for task in done:
        assert (await channel_of(engine, task["id"])).startswith("ch_")


@pytest.mark.usefixtures("primary_channel")
async def test_a_403_opens_the_primarys_circuit_at_once(
    settings: Settings, engine: AsyncEngine, primary: Sim, simulator: Sim
) -> None:
    """The upstream refusing the channel's key is no passing fault: the first 403 opens
    the circuit, below the threshold of 2, and later tasks skip the primary."""
    await primary.configure(error_kind="submit_403")
    done = await run_tasks(settings, 3, "forbidden")
    assert [t["status"] for t in done] == ["completed"] * 3
    assert (await primary.stats())["submits"] == 1
    assert (await simulator.stats())["submits"] == 3


@pytest.mark.usefixtures("primary_channel")
async def test_a_429_moves_the_task_on_and_the_primary_is_left_alone_for_its_retry_after(
    settings: Settings, primary: Sim, simulator: Sim
) -> None:
    await primary.configure(error_kind="submit_429", retry_after=30)
    started = time.monotonic()
    done = await run_tasks(settings, 3, "rate limited")
    assert [t["status"] for t in done] == ["completed"] * 3
    # Only the first task met the 429; the back-off kept the others from the primary.
    assert (await primary.stats())["submits"] == 1
    assert time.monotonic() - started < 20


async def test_a_request_the_upstream_refuses_as_invalid_fails_at_once_without_failover(
    settings: Settings, engine: AsyncEngine, primary: Sim, simulator: Sim, primary_channel: str
) -> None:
    await primary.configure(error_kind="submit_400")
    done = await run_tasks(settings, 1, "refused")
    assert done[0]["status"] == "failed"
    assert done[0]["error"]["code"] == "upstream_rejected"
    assert "rejected the request as invalid" in done[0]["error"]["message"]
    assert "127.0.0.1" not in done[0]["error"]["message"]
    # The request's fault: no other channel was tried, and the primary only once.
    assert (await primary.stats())["submits"] == 1
    assert (await simulator.stats())["submits"] == 0
    # Nothing was charged.
    assert done[0]["usage"]["credits_charged"] == 0


async def test_a_channel_speaking_the_unified_api_serves_a_catalogue_model(
    settings: Settings, engine: AsyncEngine, simulator: Sim, simulator_url: str
) -> None:
    """Tollgate in front of another gateway of the same shape: a unified-async channel."""
    name = f"unified-{uuid.uuid4().hex[:8]}"
    fields = {
        "name": name,
        "adapter": "unified",
        "base_url": f"{simulator_url}/unified",
        "api_key": SIM_KEY,
        "models": {MODEL: "krea-2-medium-upstream"},
        "priority": 20,
    }
    async with transaction(session_factory(engine)) as session:
        channel = await channels.create_channel(session, fields, load_catalog())
    try:
        done = await run_tasks(settings, 1, "through another gateway")
    finally:
        async with transaction(session_factory(engine)) as session:
            await channels.delete_channel(session, name)
    assert done[0]["status"] == "completed", done
    assert len(done[0]["results"]) == 1
    assert await channel_of(engine, done[0]["id"]) == channel.id
