"""Waiting for a task: long-poll (``Prefer: wait=N``), server-sent events, the signal.

The gateway runs under uvicorn on a loopback port (real HTTP, real concurrency),
against real PostgreSQL and Redis. Tasks are moved through their states with
``gateway/tasks/lifecycle.py`` itself, on an engine that publishes its changes
the way a worker's does (``events.attach``), so each test controls when a
change commits and can time the answer against it. A change committed on an
engine with no publisher is a lost signal.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from litestar import Litestar
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.db import create_engine
from gateway.deps import Services
from gateway.redis_keys import task_events_channel
from gateway.settings import Settings
from gateway.tasks import events, lifecycle
from tests.conftest import bearer, make_tenant_key, serve_app

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def app(settings: Settings) -> Litestar:
    return create_app(settings)


@pytest.fixture
async def base_url(app: Litestar, settings: Settings) -> AsyncIterator[str]:
    async with serve_app(settings, app) as url:
        yield url


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=30) as client:
        yield client


def services_of(app: Litestar) -> Services:
    found: Services = app.state.services
    return found


@pytest.fixture
async def worker_engine(settings: Settings, redis: Redis) -> AsyncIterator[AsyncEngine]:
    """An engine whose committed task changes are signalled, as in a worker process."""
    engine = create_engine(settings)
    publisher = events.Publisher(redis, task_events_channel(settings.queue_name))
    publisher.start()
    events.attach(engine, publisher)
    yield engine
    await publisher.close()
    events.detach(engine)
    await engine.dispose()


@pytest.fixture
async def silent_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine that publishes nothing: its changes are lost signals."""
    engine = create_engine(settings)
    yield engine
    await engine.dispose()


async def submit(http: httpx.AsyncClient, key: str) -> str:
    response = await http.post(
        "/v1/images/generations",
        json={"model": "flux-1-schnell", "prompt": "a lighthouse", "size": "512x512"},
        headers=bearer(key),
    )
    assert response.status_code == 200, response.text
    task_id: str = response.json()["id"]
    return task_id


async def until(predicate: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def claim(engine: AsyncEngine, task_id: str) -> None:
    async with engine.begin() as conn:
        assert await lifecycle.claim(conn, task_id, 0, 30) is not None


async def progress(engine: AsyncEngine, task_id: str, value: int) -> None:
    async with engine.begin() as conn:
        assert await lifecycle.heartbeat(conn, task_id, 0, 30, progress=value)


async def complete(engine: AsyncEngine, task_id: str) -> float:
    """Complete the claimed task; the time its transaction committed."""
    async with engine.begin() as conn:
        assert await lifecycle.complete(conn, task_id, 0, [f"{task_id}/0.png"], 3600)
    return time.monotonic()


def long_poll(http: httpx.AsyncClient, key: str, task_id: str, wait: str) -> Any:
    return asyncio.create_task(
        http.get(f"/v1/tasks/{task_id}", headers={**bearer(key), "Prefer": wait})
    )


# --- Long-poll ----------------------------------------------------------------------


async def test_long_poll_answers_within_100_ms_of_completion_holding_no_connection(
    app: Litestar,
    http: httpx.AsyncClient,
    tenant_key: tuple[str, str],
    worker_engine: AsyncEngine,
) -> None:
    _, key = tenant_key
    task_id = await submit(http, key)
    await claim(worker_engine, task_id)
    services = services_of(app)
    await until(services.task_events.connected.is_set)
    waiting = long_poll(http, key, task_id, "wait=20")
    await until(lambda: services.task_events.waiting == 1)
    await asyncio.sleep(0.3)
    # While it waits the request holds no database connection.
    assert services.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert not waiting.done()

    committed = await complete(worker_engine, task_id)
    response = await waiting
    answered = time.monotonic()

    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "wait=20"
    body = response.json()
    assert body["status"] == "completed"
    assert body["results"]
    assert answered - committed < 0.1, f"answered {answered - committed:.3f}s after the commit"
    assert services.task_events.waiting == 0


async def test_long_poll_of_an_unfinished_task_answers_at_n_seconds(
    http: httpx.AsyncClient, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    task_id = await submit(http, key)
    started = time.monotonic()
    response = await http.get(f"/v1/tasks/{task_id}", headers={**bearer(key), "Prefer": "wait=1"})
    took = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["status"] == "pending"
    assert response.headers["Preference-Applied"] == "wait=1"
    assert 1.0 <= took < 1.5, took


async def test_long_poll_of_a_final_task_answers_at_once_and_caps_the_wait_at_60(
    http: httpx.AsyncClient, tenant_key: tuple[str, str], worker_engine: AsyncEngine
) -> None:
    _, key = tenant_key
    task_id = await submit(http, key)
    await claim(worker_engine, task_id)
    await complete(worker_engine, task_id)
    started = time.monotonic()
    response = await http.get(
        f"/v1/tasks/{task_id}", headers={**bearer(key), "Prefer": "respond-async, wait=600"}
    )
    assert time.monotonic() - started < 0.5
    assert response.json()["status"] == "completed"
    assert response.headers["Preference-Applied"] == "wait=60"


async def test_without_a_wait_preference_the_task_is_answered_at_once(
    http: httpx.AsyncClient, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    task_id = await submit(http, key)
    response = await http.get(
        f"/v1/tasks/{task_id}", headers={**bearer(key), "Prefer": "return=minimal"}
    )
    assert response.status_code == 200
    assert "Preference-Applied" not in response.headers


@pytest.mark.parametrize("prefer", ["wait=soon", "wait=-1", "wait=1.5", "wait="])
async def test_a_malformed_wait_is_400_naming_prefer(
    http: httpx.AsyncClient, tenant_key: tuple[str, str], prefer: str
) -> None:
    _, key = tenant_key
    task_id = await submit(http, key)
    response = await http.get(f"/v1/tasks/{task_id}", headers={**bearer(key), "Prefer": prefer})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("Prefer: wait must be")


async def test_another_tenants_task_is_404_to_a_long_poll_and_to_events(
    http: httpx.AsyncClient, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    task_id = await submit(http, key)
    _, other = await make_tenant_key(settings)
    started = time.monotonic()
    response = await http.get(f"/v1/tasks/{task_id}", headers={**bearer(other), "Prefer": "wait=5"})
    assert response.status_code == 404
    assert time.monotonic() - started < 1
    response = await http.get(f"/v1/tasks/{task_id}/events", headers=bearer(other))
    assert response.status_code == 404


async def test_a_lost_signal_is_answered_by_a_re_read_at_the_deadline(
    http: httpx.AsyncClient,
    tenant_key: tuple[str, str],
    worker_engine: AsyncEngine,
    silent_engine: AsyncEngine,
) -> None:
    _, key = tenant_key
    task_id = await submit(http, key)
    await claim(worker_engine, task_id)
    waiting = long_poll(http, key, task_id, "wait=2")
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await complete(silent_engine, task_id)  # committed, never signalled
    response = await waiting
    assert response.json()["status"] == "completed"
    assert time.monotonic() - started < 2.2


async def test_a_waiting_request_survives_a_redis_reconnect(
    app: Litestar,
    http: httpx.AsyncClient,
    tenant_key: tuple[str, str],
    redis: Redis,
    worker_engine: AsyncEngine,
    silent_engine: AsyncEngine,
) -> None:
    _, key = tenant_key
    services = services_of(app)
    hub = services.task_events
    await until(hub.connected.is_set)
    task_id = await submit(http, key)
    await claim(worker_engine, task_id)
    waiting = long_poll(http, key, task_id, "wait=30")
    await until(lambda: hub.waiting == 1)

    # The task ends while its signal cannot reach this gateway (lost), then the
    # gateway's subscription is cut: it reconnects and re-reads what it watches.
    await complete(silent_engine, task_id)
    await asyncio.sleep(0.2)
    assert not waiting.done()
    started = time.monotonic()
    killed = await kill_client(redis, hub.client_name)
    assert killed == 1
    response = await waiting
    assert response.json()["status"] == "completed"
    assert time.monotonic() - started < 3, "not answered after the reconnect"
    assert hub.connections >= 2

    # And signals flow again on the new subscription.
    second = await submit(http, key)
    await claim(worker_engine, second)
    waiting = long_poll(http, key, second, "wait=30")
    await until(lambda: hub.waiting == 1)
    committed = await complete(worker_engine, second)
    response = await waiting
    assert response.json()["status"] == "completed"
    assert time.monotonic() - committed < 0.5


async def kill_client(redis: Redis, name: str) -> int:
    """Cut one named connection of this Redis (CLIENT KILL by id): a real disconnect."""
    clients = await redis.client_list()
    ids = [c["id"] for c in clients if c.get("name") == name]
    killed = 0
    for client_id in ids:
        killed += int(await redis.execute_command("CLIENT", "KILL", "ID", client_id))
    return killed


async def test_many_waiters_hold_no_connection_and_all_answer_on_one_signal_each(
    app: Litestar,
    http: httpx.AsyncClient,
    tenant_key: tuple[str, str],
    worker_engine: AsyncEngine,
) -> None:
    _, key = tenant_key
    services = services_of(app)
    task_ids = [await submit(http, key) for _ in range(5)]
    for task_id in task_ids:
        await claim(worker_engine, task_id)
    waiting = [long_poll(http, key, task_id, "wait=20") for task_id in task_ids for _ in range(10)]
    await until(lambda: services.task_events.waiting == 50)
    # Each read its task once, then gave its connection back before waiting.
    pool: Any = services.engine.pool
    await until(lambda: pool.checkedout() == 0)
    await asyncio.sleep(0.3)
    assert pool.checkedout() == 0
    assert not any(request.done() for request in waiting)
    reads = services.task_events.reads
    for task_id in task_ids:
        await complete(worker_engine, task_id)
    answers = await asyncio.gather(*waiting)
    assert {r.json()["status"] for r in answers} == {"completed"}
    # One read per signal at most, never one per waiting request.
    assert services.task_events.reads - reads <= len(task_ids)


# --- Server-sent events -------------------------------------------------------------


class EventReader:
    """Reads an event stream over real HTTP, event by event."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    async def next(self, within: float = 5.0) -> dict[str, str] | None:
        """The next event (id, event, data), or None when the stream ended."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(within):
            async for line in self.lines:
                if not line:
                    if "data" in fields:
                        return fields
                    fields = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
        return None


@contextlib.asynccontextmanager
async def event_stream(
    http: httpx.AsyncClient, key: str, task_id: str, last_event_id: str | None = None
) -> AsyncIterator[EventReader]:
    headers = bearer(key)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield EventReader(response)


async def test_events_carry_every_transition_once_and_end_after_the_final_state(
    app: Litestar,
    http: httpx.AsyncClient,
    tenant_key: tuple[str, str],
    worker_engine: AsyncEngine,
) -> None:
    _, key = tenant_key
    task_id = await submit(http, key)
    hub = services_of(app).task_events
    seen: list[str] = []
    async with event_stream(http, key, task_id) as stream:
        first = await stream.next()
        assert first is not None
        assert first["event"] == "task"
        seen.append(first["id"])
        await until(lambda: hub.waiting == 1)
        await claim(worker_engine, task_id)
        seen.append((await stream.next() or {})["id"])
        await progress(worker_engine, task_id, 40)
        seen.append((await stream.next() or {})["id"])
        await progress(worker_engine, task_id, 40)  # signalled, but nothing changed
        await progress(worker_engine, task_id, 70)
        seen.append((await stream.next() or {})["id"])
        await complete(worker_engine, task_id)
        last = await stream.next()
        assert last is not None
        seen.append(last["id"])
        assert '"status":"completed"' in last["data"]
        assert await stream.next() is None  # the stream ends after the final state
    assert seen == ["pending.0", "processing.5", "processing.40", "processing.70", "completed.100"]


async def test_events_resume_after_a_dropped_connection_without_repeating(
    http: httpx.AsyncClient, tenant_key: tuple[str, str], worker_engine: AsyncEngine
) -> None:
    _, key = tenant_key
    task_id = await submit(http, key)
    async with event_stream(http, key, task_id) as stream:
        first = await stream.next()
        assert first is not None
        assert first["id"] == "pending.0"
    # Dropped. Meanwhile the task runs on.
    await claim(worker_engine, task_id)
    await progress(worker_engine, task_id, 50)
    async with event_stream(http, key, task_id, last_event_id="pending.0") as stream:
        resumed = await stream.next()
        assert resumed is not None
        assert resumed["id"] == "processing.50"
    async with event_stream(http, key, task_id, last_event_id="processing.50") as stream:
        await complete(worker_engine, task_id)
        final = await stream.next()
        assert final is not None
        assert final["id"] == "completed.100"
        assert await stream.next() is None
    # Resuming after the final event: nothing more to say, the stream just ends.
    async with event_stream(http, key, task_id, last_event_id="completed.100") as stream:
        assert await stream.next() is None


async def test_a_malformed_last_event_id_is_400_naming_it(
    http: httpx.AsyncClient, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    task_id = await submit(http, key)
    response = await http.get(
        f"/v1/tasks/{task_id}/events", headers={**bearer(key), "Last-Event-ID": "42"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("Last-Event-ID:")
