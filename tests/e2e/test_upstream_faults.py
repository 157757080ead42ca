"""One channel per model and an upstream that misbehaves: slow polls, 429s, wrong-size images.

Real gateway (in process), real worker, real PostgreSQL and Redis, the session's simulator
process as the upstream. The rules under test: a submitted job is paid for, so a slow poll
never leads to a second submit, and a job given up is cancelled upstream and counted; a
429ing account is asked once per Retry-After and given up after the cap; an image that is
not the size asked for is never charged.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SIM_KEY,
    Sim,
    bearer,
    make_settings,
    make_tenant_key,
    start_worker,
    stop_worker,
    wait_for_status,
)
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import metrics
from gateway.app import create_app
from gateway.channels import service as channels
from gateway.db import session_factory, transaction
from gateway.settings import Settings
from pricing.catalog import load_catalog

Client = AsyncTestClient[Any]
# protocol -> (catalogue model, the channel that serves it)
PROTOCOLS = {
    "krea": ("krea-2-medium", "env:krea"),
    "unified": ("krea-2-medium", "unified"),
    "bfl": ("flux-1-1-pro", "env:bfl"),
}


def fault_settings(database_url: str, simulator_url: str, storage: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "upstream_poll_timeout_seconds": 0.5,
        "upstream_retry_base_seconds": 0.1,
        "channel_cache_ttl_seconds": 0.0,
        "task_deadline_seconds": 20,
    }
    values.update(extra)
    return make_settings(database_url, simulator_url, storage, **values)


@pytest.fixture
def settings(database_url: str, simulator_url: str, tmp_path: Path) -> Settings:
    return fault_settings(database_url, simulator_url, tmp_path / "storage")


@pytest.fixture
async def served(
    request: pytest.FixtureRequest, engine: AsyncEngine, simulator_url: str
) -> AsyncIterator[tuple[str, str, str]]:
    """(protocol, model, channel name) for the protocol in ``request.param``. For the unified
    API, a channel on the simulator ahead of env:krea for krea-2-medium, removed afterwards."""
    protocol: str = request.param
    model, channel = PROTOCOLS[protocol]
    if protocol != "unified":
        yield protocol, model, channel
        return
    channel = f"unified-{uuid.uuid4().hex[:8]}"
    fields = {
        "name": channel,
        "adapter": "unified",
        "base_url": f"{simulator_url}/unified",
        "api_key": SIM_KEY,
        "models": {model: "krea-2-medium-upstream"},
        "priority": 20,
    }
    async with transaction(session_factory(engine)) as session:
        await channels.create_channel(session, fields, load_catalog())
    yield protocol, model, channel
    async with transaction(session_factory(engine)) as session:
        await channels.delete_channel(session, channel)


async def run_one(
    settings: Settings,
    body: dict[str, Any],
    *,
    wait: float = 40,
    meanwhile: Any = None,
    afterwards: Any = None,
) -> dict[str, Any]:
    """Submit one task through a real worker; its final state (``meanwhile`` runs after the
    submit, while the task is under way; ``afterwards`` once it is final, the worker still
    running)."""
    _, key = await make_tenant_key(settings)
    worker, running = start_worker(settings)
    try:
        async with AsyncTestClient(
            app=create_app(settings), base_url="http://testserver.local"
        ) as client:
            response = await client.post("/v1/images/generations", json=body, headers=bearer(key))
            assert response.status_code == 200, response.text
            if meanwhile is not None:
                await meanwhile()
            final = await wait_for_status(
                client, key, response.json()["id"], {"completed", "failed"}, wait=wait
            )
            if afterwards is not None:
                await afterwards()
            return final
    finally:
        await stop_worker(worker, running)


def abandoned(provider: str, channel: str, reason: str, cancel: str) -> float:
    """The abandoned-jobs counter as this process's registry holds it (the worker runs here)."""
    sample = metrics.REGISTRY.get_sample_value(
        "tollgate_upstream_jobs_abandoned_total",
        {"provider": provider, "channel": channel, "reason": reason, "cancel": cancel},
    )
    return sample or 0.0


# --- slow polls: one submit per task ------------------------------------------------------


@pytest.mark.parametrize("served", PROTOCOLS, indirect=True)
async def test_polls_slower_than_their_time_limit_never_submit_the_task_again(
    settings: Settings, simulator: Sim, served: tuple[str, str, str]
) -> None:
    _, model, _ = served
    # Every poll outlasts the 0.5 s poll limit for 4 s; the job itself takes 5 s.
    await simulator.configure(latency=5, error_kind="slow_poll", hang_seconds=1.0)

    async def polls_recover() -> None:
        await asyncio.sleep(4)
        await simulator.configure(error_kind="none")

    task = await run_one(
        settings, {"model": model, "prompt": "slow polls"}, meanwhile=polls_recover
    )
    assert task["status"] == "completed", task
    stats = await simulator.stats()
    assert stats["submits"] == 1, stats
    assert stats["polls"] >= 3  # the timed-out polls were asked again


@pytest.mark.parametrize("served", PROTOCOLS, indirect=True)
async def test_polls_slow_until_the_deadline_fail_the_task_and_give_the_job_up(
    database_url: str,
    simulator_url: str,
    tmp_path: Path,
    simulator: Sim,
    served: tuple[str, str, str],
) -> None:
    settings = fault_settings(
        database_url, simulator_url, tmp_path / "storage", task_deadline_seconds=6
    )
    protocol, model, channel = served
    adapter = protocol
    await simulator.configure(latency=60, error_kind="slow_poll", hang_seconds=1.0)
    cancel = "unsupported" if protocol == "bfl" else "confirmed"
    before = abandoned(adapter, channel, "deadline", cancel)

    async def given_up() -> None:
        # The run or the sweeper, whichever fails the task at its deadline first, gives
        # the job up; the sweeper's way is a cancel job, which the worker runs after.
        deadline = time.monotonic() + 10
        while abandoned(adapter, channel, "deadline", cancel) == before:
            assert time.monotonic() < deadline, "the job was never given up"
            await asyncio.sleep(0.1)

    task = await run_one(
        settings, {"model": model, "prompt": "never polled"}, wait=30, afterwards=given_up
    )
    assert task["status"] == "failed", task
    assert task["error"]["code"] == "timeout"
    assert task["usage"]["credits_charged"] == 0
    stats = await simulator.stats()
    assert stats["submits"] == 1, stats
    # Given up, the job is cancelled upstream where the protocol can (BFL cannot).
    assert stats["cancels"] == (0 if protocol == "bfl" else 1), stats
    if protocol != "bfl":
        assert stats["jobs_active"] == 0
    assert abandoned(adapter, channel, "deadline", cancel) == before + 1


# --- 429: one request per Retry-After, then upstream_rate_limited -----------------------------


async def test_a_429ing_account_is_asked_once_per_retry_after_then_fails_rate_limited(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim
) -> None:
    settings = fault_settings(
        database_url, simulator_url, tmp_path / "storage", upstream_retry_after_cap_seconds=5
    )
    await simulator.configure(error_kind="submit_429", retry_after=2)
    started = time.monotonic()
    task = await run_one(settings, {"model": "krea-2-medium", "prompt": "rate limited"})
    elapsed = time.monotonic() - started
    assert task["status"] == "failed", task
    assert task["error"]["code"] == "upstream_rate_limited"
    assert "429" in task["error"]["message"]
    assert "127.0.0.1" not in task["error"]["message"]
    assert task["usage"]["credits_charged"] == 0
    # Asked at 0, 2 and 4 s: the waits (2 + 2) are within the 5 s cap, a third would not be.
    assert (await simulator.stats())["submits"] == 3
    assert elapsed >= 4


async def test_a_retry_after_beyond_the_cap_fails_rate_limited_at_once(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim
) -> None:
    settings = fault_settings(
        database_url, simulator_url, tmp_path / "storage", upstream_retry_after_cap_seconds=5
    )
    await simulator.configure(error_kind="submit_429", retry_after=600)
    started = time.monotonic()
    task = await run_one(settings, {"model": "krea-2-medium", "prompt": "an hour off"})
    assert task["error"]["code"] == "upstream_rate_limited", task
    assert (await simulator.stats())["submits"] == 1
    assert time.monotonic() - started < 15


# --- image sizes --------------------------------------------------------------------------------


async def test_a_completed_task_shows_each_results_width_and_height(
    settings: Settings, simulator: Sim
) -> None:
    body = {"model": "flux-1-1-pro-ultra", "prompt": "wide", "size": "16:9"}
    task = await run_one(settings, body)
    assert task["status"] == "completed", task
    assert task["result_sizes"] == [{"width": 2048, "height": 1152}]
    assert len(task["results"]) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"model": "krea-2-medium", "prompt": "wrong size"},
        {"model": "flux-1-1-pro-ultra", "prompt": "wrong size", "size": "16:9"},
        {"model": "chatgpt-image", "prompt": "wrong size"},
    ],
    ids=["krea", "bfl-ultra", "openai-inline"],
)
async def test_an_image_not_of_the_size_asked_for_fails_and_is_never_charged(
    settings: Settings, simulator: Sim, body: dict[str, Any]
) -> None:
    await simulator.configure(error_kind="wrong_size")
    task = await run_one(settings, body)
    assert task["status"] == "failed", task
    assert task["error"]["code"] == "upstream_bad_result"
    assert "image for a" in task["error"]["message"]
    assert task["usage"]["credits_charged"] == 0
    assert "result_sizes" not in task
