"""Channel routing and circuits: the directory over real PostgreSQL, circuits over real Redis."""

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from arq.worker import Retry
from conftest import commands_of
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.channels import service as channels
from gateway.db import session_factory, transaction
from gateway.redis_keys import slot_name, slots_epoch_key, upstream_line_key
from gateway.settings import Settings
from pricing.catalog import load_catalog
from workers.admission import Admission
from workers.circuits import Circuits
from workers.deps import WorkerDeps
from workers.providers.base import Endpoint
from workers.providers.krea import KreaProvider
from workers.routing import Directory, Route, weighted_order
from workers.upstream_slots import UpstreamSlots

CATALOG = load_catalog()


def route(route_id: str, priority: int = 0, weight: int = 1) -> Route:
    endpoint = Endpoint(base_url="http://upstream.invalid", api_key="k")
    return Route(
        id=route_id,
        name=route_id,
        adapter="krea",
        endpoint=endpoint,
        models={"krea-2-medium": None},
        priority=priority,
        weight=weight,
        max_concurrency=1,
        provider=KreaProvider(httpx.AsyncClient(), endpoint),
    )


def test_higher_priority_always_comes_first() -> None:
    rng = random.Random(7)
    routes = [route("low", 0, weight=1000), route("high", 5), route("mid", 1, weight=1000)]
    for _ in range(200):
        assert [r.id for r in weighted_order(routes, rng)] == ["high", "mid", "low"]


def test_equal_priorities_come_first_in_proportion_to_their_weights() -> None:
    rng = random.Random(11)
    routes = [route("a", weight=1), route("b", weight=3), route("c", weight=6)]
    firsts = Counter(weighted_order(routes, rng)[0].id for _ in range(20_000))
    assert firsts["a"] / 20_000 == pytest.approx(0.1, abs=0.015)
    assert firsts["b"] / 20_000 == pytest.approx(0.3, abs=0.015)
    assert firsts["c"] / 20_000 == pytest.approx(0.6, abs=0.015)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
async def made_channels(engine: AsyncEngine) -> AsyncIterator[list[str]]:
    """Names of channels a test creates; removed afterwards (the table is shared)."""
    names: list[str] = []
    yield names
    async with transaction(session_factory(engine)) as session:
        for name in names:
            await channels.delete_channel(session, name)


async def add_channel(engine: AsyncEngine, names: list[str], **fields: Any) -> channels.Channel:
    name = f"test-{uuid.uuid4().hex[:8]}"
    values = {
        "name": name,
        "adapter": "krea",
        "base_url": "http://127.0.0.1:9",
        "api_key": "sk-routing-test",
        "models": {"krea-2-medium": None},
        **fields,
    }
    async with transaction(session_factory(engine)) as session:
        channel = await channels.create_channel(session, values, CATALOG)
    names.append(name)
    return channel


async def test_the_directory_merges_database_and_environment_channels(
    settings: Settings, engine: AsyncEngine, http: httpx.AsyncClient, made_channels: list[str]
) -> None:
    mapped = await add_channel(
        engine, made_channels, priority=5, models={"krea-2-medium": "krea/krea-2/medium-v2"}
    )
    await add_channel(engine, made_channels, priority=9, enabled=False)
    directory = Directory(settings, CATALOG, engine, http)
    found = await directory.candidates("krea-2-medium")
    # The disabled channel is left out; the env channel serves the catalogue's models.
    assert [r.id for r in found] == [mapped.id, "env:krea"]
    entry = CATALOG.model("krea-2-medium")
    assert entry is not None
    assert found[0].upstream_model(entry) == "krea/krea-2/medium-v2"
    assert found[1].upstream_model(entry) == entry.upstream_model
    assert [r.id for r in await directory.candidates("flux-1-schnell")] == ["env:siliconflow"]


async def test_a_changed_channel_reaches_the_directory_after_its_ttl(
    settings: Settings, engine: AsyncEngine, http: httpx.AsyncClient, made_channels: list[str]
) -> None:
    ttl = settings.model_copy(update={"channel_cache_ttl_seconds": 0.3})
    channel = await add_channel(engine, made_channels, priority=5)
    directory = Directory(ttl, CATALOG, engine, http)
    assert (await directory.candidates("krea-2-medium"))[0].id == channel.id
    async with transaction(session_factory(engine)) as session:
        await channels.update_channel(session, channel.id, {"enabled": False}, CATALOG)
    assert (await directory.candidates("krea-2-medium"))[0].id == channel.id  # cached
    await asyncio.sleep(0.35)
    assert [r.id for r in await directory.candidates("krea-2-medium")] == ["env:krea"]


@pytest.fixture
async def circuits(redis: Redis) -> Circuits:
    return Circuits(
        redis,
        namespace=f"test-{uuid.uuid4().hex}",
        threshold=3,
        window_seconds=5,
        cooldown_seconds=0.5,
    )


async def test_the_threshold_of_failures_opens_the_circuit_for_the_cooldown(
    circuits: Circuits,
) -> None:
    assert not (await circuits.state("ch", "t1:0")).open
    assert not await circuits.failure("ch")
    assert not await circuits.failure("ch")
    assert not (await circuits.state("ch", "t1:0")).open
    assert await circuits.failure("ch")  # the third opens it
    state = await circuits.state("ch", "t1:0")
    assert state.open
    assert 0 < state.retry_in <= 0.5
    assert not (await circuits.state("other", "t1:0")).open


async def test_a_success_forgets_earlier_failures(circuits: Circuits) -> None:
    await circuits.failure("ch")
    await circuits.failure("ch")
    await circuits.success("ch")
    assert not await circuits.failure("ch")
    assert not await circuits.failure("ch")
    assert not (await circuits.state("ch", "t:0")).open


async def test_half_open_lets_one_probe_through_and_its_outcome_decides(
    circuits: Circuits,
) -> None:
    for _ in range(3):
        await circuits.failure("ch")
    await asyncio.sleep(0.55)
    # Half-open: the first asker is the probe, others wait; the probe may ask again.
    assert not (await circuits.state("ch", "probe:0")).open
    assert (await circuits.state("ch", "other:0")).open
    assert not (await circuits.state("ch", "probe:0")).open
    # The probe fails: open again at once, without three more failures.
    assert await circuits.failure("ch")
    assert (await circuits.state("ch", "probe:0")).open
    await asyncio.sleep(0.55)
    assert not (await circuits.state("ch", "probe2:0")).open
    await circuits.success("ch")
    # Closed: everyone passes, and it takes the full threshold to open it again.
    assert not (await circuits.state("ch", "other:0")).open
    assert not await circuits.failure("ch")
    assert not (await circuits.state("ch", "other:0")).open


# ---------------------------------------------------------------- admission: circuit and slot


def admission(redis: Redis, circuits: Circuits, namespace: str, holder: str) -> Admission:
    """A run's admission over real Redis: the circuits' namespace is the slots' queue."""
    slots = UpstreamSlots(redis, lease_seconds=30, poll_seconds=0.1, queue_name=namespace)
    settings = SimpleNamespace(queue_name=namespace, lease_seconds=30.0)
    deps = SimpleNamespace(slots=slots, circuits=circuits, settings=settings)
    return Admission(cast(WorkerDeps, deps), holder)


async def test_a_run_enters_a_channel_whose_circuit_is_closed_in_one_command(
    redis: Redis,
) -> None:
    """The circuit is read in the slot's grant, one script: one round trip where a pipeline
    of the circuit's keys and the grant's script took two."""
    namespace = f"test-{uuid.uuid4().hex}"
    # A cool-down long enough for the steps taken within it on a slow machine.
    circuits = Circuits(
        redis, namespace=namespace, threshold=1, window_seconds=5, cooldown_seconds=2.0
    )
    await redis.set(slots_epoch_key(namespace), b"1")  # Redis holds the slots' state
    channel_a, channel_b = route("a"), route("b")
    warm = admission(redis, circuits, namespace, "warm:0")  # Redis loads the script
    assert await warm.enter_first([channel_b], ticket_ms=1, running_on=None) == (channel_b, False)
    await warm.release_slot()

    entered: list[object] = []

    async def enter(holder: str, routes: list[Route]) -> None:
        """A run enters; what it entered is noted and its slot given back."""
        run = admission(redis, circuits, namespace, holder)
        entered.append(await run.enter_first(routes, ticket_ms=2, running_on=None))
        await run.release_slot()

    # The grant, then the release.
    assert await commands_of(redis, enter("t1:0", [channel_a])) == ["EVALSHA"] * 2
    assert entered.pop() == (channel_a, False)

    # Open: the channel is passed over without a place in its line; the next one serves.
    assert await circuits.failure("a")
    # a's circuit, b's slot, a's line left (an earlier run may wait there), the release.
    assert await commands_of(redis, enter("t2:0", [channel_a, channel_b])) == ["EVALSHA"] * 4
    assert entered.pop() == (channel_b, False)
    assert await redis.zscore(upstream_line_key(slot_name(namespace, "a")), "t2:0") is None
    with pytest.raises(Retry):
        await enter("t3:0", [channel_a])

    # Half-open after the cool-down: one run takes the probe (and the slot); others wait.
    await asyncio.sleep(2.05)
    probing = admission(redis, circuits, namespace, "t4:0")
    assert await probing.enter_first([channel_a], ticket_ms=2, running_on=None) == (
        channel_a,
        False,
    )
    with pytest.raises(Retry):
        await enter("t5:0", [channel_a])
    await probing.release_slot()
    await redis.delete(*(await redis.keys(f"*{namespace}*")))
