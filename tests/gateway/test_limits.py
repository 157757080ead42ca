"""Limits over HTTP: request rates, tasks in flight, model access, key budgets, the CLI.

Limits are off in ``make_settings``; each test turns on the ones it checks,
through the admin API (``PATCH /admin/.../limits``) or the CLI, as an operator
would. Parallel submissions run the app under uvicorn in this event loop (the
litestar test client serves one request at a time). Every test leaves its
tasks final, so the suite's ledger check (in flight == open tasks) stays clean.
"""

import asyncio
import contextlib
import json
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import (
    Sim,
    assert_error,
    bearer,
    make_settings,
    make_tenant_key,
    rows_of,
    run_cli,
    scalar,
    serve_app,
    start_worker,
    stop_worker,
    wait_for_status,
)
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.ledger import service as ledger
from gateway.limits.service import RateLimit, RateLimiter
from gateway.redis_keys import rate_key_for_key, rate_key_for_tenant
from gateway.settings import Settings
from gateway.tasks import lifecycle
from gateway.tenants.models import hash_key
from pricing.catalog import load_catalog

Client = AsyncTestClient[Any]

MODELS = "/v1/models"
GENERATIONS = "/v1/images/generations"
CHEAP = {"model": "krea-2-medium", "prompt": "a slot"}  # 0.03 per call
FLUX_IMAGE = 77_700  # flux-1-pro, per image, in micro-credits (the shipped sale price)


# ---------------------------------------------------------------- fixtures and helpers


@dataclass(frozen=True, slots=True)
class Caller:
    tenant_id: str
    key_id: str
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.key)


async def new_caller(settings: Settings, engine: AsyncEngine) -> Caller:
    """A fresh tenant with 1000 credits and one key."""
    tenant_id, key = await make_tenant_key(settings)
    key_id = await scalar(engine, "SELECT id FROM api_keys WHERE key_hash = :h", h=hash_key(key))
    return Caller(tenant_id, key_id, key)


async def second_key(client: Client, settings: Settings, caller: Caller) -> Caller:
    issued = await client.post(
        f"/admin/tenants/{caller.tenant_id}/keys", json={"name": "second"}, headers=admin(settings)
    )
    assert issued.status_code == 201, issued.text
    return Caller(caller.tenant_id, issued.json()["id"], issued.json()["key"])


def admin(settings: Settings) -> dict[str, str]:
    return bearer(settings.admin_token)


def decimals(response: Any) -> Any:
    """The body with JSON numbers read exactly."""
    return json.loads(response.text, parse_float=Decimal)


async def patch_key(client: Client, settings: Settings, key_id: str, **fields: Any) -> Any:
    response = await client.patch(
        f"/admin/keys/{key_id}/limits", json=fields, headers=admin(settings)
    )
    assert response.status_code == 200, response.text
    return decimals(response)


async def patch_tenant(client: Client, settings: Settings, tenant_id: str, **fields: Any) -> Any:
    response = await client.patch(
        f"/admin/tenants/{tenant_id}/limits", json=fields, headers=admin(settings)
    )
    assert response.status_code == 200, response.text
    return decimals(response)


def rate_state(response: Any) -> dict[str, dict[str, int]]:
    """The ``RateLimit`` field, ``"key";r=4;t=1, "tenant";r=2;t=1``, by policy name."""
    items = {}
    for item in response.headers["RateLimit"].split(","):
        name, *params = item.strip().split(";")
        items[name.strip('"')] = {k: int(v) for k, v in (p.split("=") for p in params)}
    return items


async def in_flight(engine: AsyncEngine, tenant_id: str) -> int:
    return int(await scalar(engine, "SELECT in_flight FROM tenants WHERE id = :t", t=tenant_id))


async def submitted(client: Any, caller: Caller, body: dict[str, Any] = CHEAP) -> str:
    response = await client.post(GENERATIONS, json=body, headers=caller.auth)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def fail(engine: AsyncEngine, task_id: str) -> None:
    """Play the worker: fail attempt 0 (pending or processing), releasing the hold."""
    async with engine.begin() as conn:
        assert await lifecycle.fail(conn, task_id, 0, "generation_failed", "test failure")


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app under uvicorn on a free port, and a client that opens a connection per request."""
    async with (
        serve_app(settings) as url,
        httpx.AsyncClient(
            base_url=url,
            trust_env=False,
            timeout=60,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        ) as http,
    ):
        yield http


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        yield c


def own_settings(settings: Settings, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings like the test's (same database, Redis, simulator) with ``overrides``."""
    simulator_url = str(settings.upstreams["krea"].base_url).rstrip("/")
    values = {"redis_url": settings.redis_url, **overrides}
    return make_settings(settings.database_url, simulator_url, tmp_path / "own", **values)


class RedisProxy:
    """A TCP proxy to the test's Redis, in a thread of its own, that a test can cut
    (connections and port closed, as a Redis that went down) or stall (bytes no
    longer forwarded, as a frozen Redis or a partition under an open connection).

    Its own thread, because litestar's test client blocks this loop while the app runs.
    """

    def __init__(self, redis_url: str) -> None:
        target = urlsplit(redis_url)
        self._target = (target.hostname or "127.0.0.1", target.port or 6379)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Future[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.url = ""

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def __enter__(self) -> "RedisProxy":
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            pipe = asyncio.ensure_future(self._pipe(src, dst))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def _cut(self) -> None:
        self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._writers.clear()
        await self._server.wait_closed()

    async def _flow(self, flowing: bool) -> None:
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    def stall(self) -> None:
        self._call(self._flow(False))

    def cut(self) -> None:
        self._call(self._flow(True))
        self._call(self._cut())

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# ---------------------------------------------------------------- request rates


async def test_a_key_passes_its_burst_then_gets_429_until_one_interval_has_passed(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    caller = await new_caller(settings, engine)
    shown = await patch_key(
        client, settings, caller.key_id, rate_limit_per_minute=60, rate_limit_burst=5
    )
    assert shown["rate_limit_per_minute"] == {"value": 60, "from": "own"}
    assert shown["rate_limit_burst"] == {"value": 5, "from": "own"}

    left = []
    for _ in range(5):
        allowed = await client.get(MODELS, headers=caller.auth)
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["RateLimit-Policy"] == '"key";q=60;w=60'
        assert "Retry-After" not in allowed.headers
        left.append(rate_state(allowed)["key"]["r"])
    assert left == [4, 3, 2, 1, 0]

    refused = await client.get(MODELS, headers=caller.auth)
    message = assert_error(refused, 429, "rate_limit_exceeded", "key")["message"]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "retry after 1 s" in message
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["RateLimit-Policy"] == '"key";q=60;w=60'
    assert rate_state(refused)["key"]["r"] == 0
    assert rate_state(refused)["key"]["t"] >= 1

    # One emission interval (1 s at 60 per minute) later, exactly one more fits.
    await asyncio.sleep(1.05)
    again = [await client.get(MODELS, headers=caller.auth) for _ in range(2)]
    assert [r.status_code for r in again] == [200, 429]
    assert rate_state(again[0])["key"]["r"] == 0


async def test_checks_that_arrive_together_share_round_trips_and_each_counts_once(
    settings: Settings,
) -> None:
    """Concurrent checks go to Redis in pipelines (gateway/script_batch.py), each still its
    own GCRA run: of 60 at once against a burst of 20, exactly 20 pass."""
    redis = Redis.from_url(settings.redis_url)
    limiter = RateLimiter(redis, settings)
    limit = RateLimit("key", rate_key_for_key(f"batch-{secrets.token_hex(6)}"), 1, 20)
    try:
        answers = await asyncio.gather(
            *(
                limiter.batch.run([limit.redis_key], [limit.interval_us, limit.tolerance_us])
                for _ in range(60)
            )
        )
        assert Counter(int(answer[0]) for answer in answers) == {1: 20, 0: 40}
        assert limiter.batch.batches < 60
    finally:
        await redis.delete(limit.redis_key)
        await redis.aclose()


async def test_a_rate_set_without_a_burst_caps_the_burst_at_the_rate(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    """``--rpm 30`` alone: 30 pass at once, not the default burst of 100 (issue 13)."""
    assert settings.default_key_rate_limit_burst == 100
    caller = await new_caller(settings, engine)
    shown = await patch_key(client, settings, caller.key_id, rate_limit_per_minute=30)
    assert shown["rate_limit_burst"] == {"value": 30, "from": "default"}

    statuses = []
    for _ in range(40):
        response = await client.get(MODELS, headers=caller.auth)
        statuses.append(response.status_code)
        state = rate_state(response)["key"]
        assert state["r"] <= 30, response.headers["RateLimit"]
        assert state["t"] <= 60, response.headers["RateLimit"]
    # At 30 a minute one more may fit while the 40 go out (2 s each): never 40.
    assert statuses[:30] == [200] * 30
    assert statuses.count(200) <= 31
    assert statuses[-1] == 429


async def test_a_tenant_rate_without_a_burst_is_capped_too(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    caller = await new_caller(settings, engine)
    shown = await patch_tenant(client, settings, caller.tenant_id, rate_limit_per_minute=5)
    assert shown["rate_limit_burst"] == {"value": 5, "from": "default"}
    statuses = [(await client.get(MODELS, headers=caller.auth)).status_code for _ in range(8)]
    assert statuses[:5] == [200] * 5
    assert statuses[-1] == 429


async def test_headers_never_report_more_than_the_quota_or_a_longer_reset_than_the_window(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    """An explicit burst above the rate is kept, but the headers stay within the policy."""
    caller = await new_caller(settings, engine)
    await patch_key(client, settings, caller.key_id, rate_limit_per_minute=30, rate_limit_burst=100)
    for _ in range(40):
        response = await client.get(MODELS, headers=caller.auth)
        assert response.status_code == 200, response.text  # the burst of 100 applies
        assert response.headers["RateLimit-Policy"] == '"key";q=30;w=60'
        state = rate_state(response)["key"]
        assert 0 <= state["r"] <= 30, response.headers["RateLimit"]
        assert 0 <= state["t"] <= 60, response.headers["RateLimit"]


async def test_a_tenant_limit_is_shared_by_all_its_keys(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    first = await new_caller(settings, engine)
    second = await second_key(client, settings, first)
    await patch_tenant(
        client, settings, first.tenant_id, rate_limit_per_minute=60, rate_limit_burst=3
    )

    allowed = [await client.get(MODELS, headers=caller.auth) for caller in (first, second, first)]
    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert [rate_state(r)["tenant"]["r"] for r in allowed] == [2, 1, 0]
    assert allowed[0].headers["RateLimit-Policy"] == '"tenant";q=60;w=60'

    for caller in (second, first):
        refused = await client.get(MODELS, headers=caller.auth)
        assert_error(refused, 429, "rate_limit_exceeded", "tenant")
        assert refused.headers["Retry-After"] == "1"


async def test_a_request_the_tenant_limit_refuses_costs_the_key_nothing(
    settings: Settings, client: Client, engine: AsyncEngine, redis: Redis
) -> None:
    limited = await new_caller(settings, engine)
    other = await second_key(client, settings, limited)
    await patch_tenant(
        client, settings, limited.tenant_id, rate_limit_per_minute=60, rate_limit_burst=2
    )
    await patch_key(client, settings, limited.key_id, rate_limit_per_minute=60, rate_limit_burst=3)

    for _ in range(2):  # the other key uses up the tenant's burst
        assert (await client.get(MODELS, headers=other.auth)).status_code == 200
    for _ in range(4):
        refused = await client.get(MODELS, headers=limited.auth)
        message = assert_error(refused, 429, "rate_limit_exceeded", "tenant")["message"]
        assert "key" not in message
        assert refused.headers["RateLimit-Policy"] == '"key";q=60;w=60, "tenant";q=60;w=60'
        state = rate_state(refused)
        assert state["key"]["r"] == 3  # untouched
        assert state["tenant"]["r"] == 0
    assert await redis.exists(rate_key_for_key(limited.key_id)) == 0
    assert await redis.exists(rate_key_for_tenant(limited.tenant_id)) == 1

    await asyncio.sleep(1.05)  # the tenant has room for one more; the key still has its 3
    passed = await client.get(MODELS, headers=limited.auth)
    assert passed.status_code == 200, passed.text
    state = rate_state(passed)
    assert (state["key"]["r"], state["tenant"]["r"]) == (2, 0)
    assert_error(await client.get(MODELS, headers=limited.auth), 429, "rate_limit_exceeded")


async def test_redis_gone_after_start_answers_503_never_an_unlimited_pass(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    # The gateway does not start without Redis (arq's create_pool gives up after
    # its retries), so Redis goes away after start: the proxy the app reaches it
    # through closes its connections and its port.
    with RedisProxy(settings.redis_url) as proxy:
        limited = own_settings(
            settings, tmp_path, redis_url=proxy.url, default_key_rate_limit_per_minute=60
        )
        caller = await new_caller(limited, engine)
        async with app_client(limited) as c:
            assert (await c.get(MODELS, headers=caller.auth)).status_code == 200
            proxy.cut()
            for _ in range(3):
                response = await c.get(MODELS, headers=caller.auth)
                assert_error(response, 503, "service_unavailable", "Rate limits")
                assert response.json()["error"]["type"] == "api_error"
                assert response.headers["Retry-After"] == "1"
            submit = await c.post(GENERATIONS, json=CHEAP, headers=caller.auth)
            assert_error(submit, 503, "service_unavailable")
    assert await rows_of(engine, caller.tenant_id) == {"topup": 1, "tasks": 0}


async def test_a_stalled_redis_answers_503_within_seconds(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    with RedisProxy(settings.redis_url) as proxy:
        limited = own_settings(
            settings, tmp_path, redis_url=proxy.url, default_key_rate_limit_per_minute=60
        )
        caller = await new_caller(limited, engine)
        async with served(limited) as http:
            try:
                assert (await http.get(MODELS, headers=caller.auth)).status_code == 200
                proxy.stall()
                response = await http.get(MODELS, headers=caller.auth, timeout=3)
            finally:
                proxy.cut()  # lets the stuck request end, so the server can stop
    assert_error(response, 503, "service_unavailable")


@pytest.mark.parametrize("per_minute", [60, 600, 3000])
def test_a_rate_that_divides_a_minute_is_enforced_exactly(per_minute: int) -> None:
    limit = RateLimit("key", "k", per_minute, 1)
    assert limit.interval_us * per_minute == 60_000_000


@pytest.mark.parametrize("per_minute", [7000, 45_000, 100_000])
def test_a_rate_that_does_not_divide_a_minute_is_enforced_within_one_percent(
    per_minute: int,
) -> None:
    enforced = 60_000_000 / RateLimit("key", "k", per_minute, 1).interval_us
    assert abs(enforced - per_minute) / per_minute < 0.01


# ---------------------------------------------------------------- tasks in flight


async def test_the_task_past_the_in_flight_cap_gets_429_and_a_failed_task_frees_its_slot(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    caller = await new_caller(settings, engine)
    shown = await patch_tenant(client, settings, caller.tenant_id, max_in_flight=3)
    assert shown["max_in_flight"] == {"value": 3, "from": "own"}

    tasks = [await submitted(client, caller) for _ in range(3)]
    refused = await client.post(GENERATIONS, json=CHEAP, headers=caller.auth)
    message = assert_error(refused, 429, "too_many_tasks_in_flight", "in flight")["message"]
    assert "3 pending or processing" in message
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert await in_flight(engine, caller.tenant_id) == 3
    assert (await rows_of(engine, caller.tenant_id))["tasks"] == 3

    await fail(engine, tasks[0])
    assert await in_flight(engine, caller.tenant_id) == 2
    tasks[0] = await submitted(client, caller)
    shown = (
        await client.get(f"/admin/tenants/{caller.tenant_id}/limits", headers=admin(settings))
    ).json()
    assert shown["in_flight"] == 3
    for task_id in tasks:
        await fail(engine, task_id)
    assert await in_flight(engine, caller.tenant_id) == 0


async def test_100_parallel_submissions_under_a_cap_of_10_accept_exactly_10(
    settings: Settings, client: Client, engine: AsyncEngine, simulator: Sim, redis: Redis
) -> None:
    caller = await new_caller(settings, engine)
    await patch_tenant(client, settings, caller.tenant_id, max_in_flight=10)
    await simulator.configure(latency=0.05)
    async with served(settings) as http:
        responses = await asyncio.gather(
            *(
                http.post(
                    GENERATIONS,
                    json={"model": "krea-2-medium", "prompt": f"race {i}"},
                    headers=caller.auth,
                )
                for i in range(100)
            )
        )
        assert Counter(r.status_code for r in responses) == {200: 10, 429: 90}
        for refused in (r for r in responses if r.status_code == 429):
            assert_error(refused, 429, "too_many_tasks_in_flight", "10 pending or processing")
        accepted = [r.json()["id"] for r in responses if r.status_code == 200]
        assert await in_flight(engine, caller.tenant_id) == 10
        assert (await rows_of(engine, caller.tenant_id))["tasks"] == 10

        worker, running = start_worker(settings)
        try:
            for task_id in accepted:
                done = await wait_for_status(http, caller.key, task_id, {"completed", "failed"})
                assert done["status"] == "completed", done
            assert await in_flight(engine, caller.tenant_id) == 0
            later = await submitted(http, caller)
            done = await wait_for_status(http, caller.key, later, {"completed", "failed"})
            assert done["status"] == "completed", done
        finally:
            await stop_worker(worker, running)
    assert await in_flight(engine, caller.tenant_id) == 0
    async with engine.connect() as conn:
        assert await ledger.check(conn) == []


async def test_a_task_the_upstream_fails_frees_its_slot(
    settings: Settings, client: Client, engine: AsyncEngine, simulator: Sim
) -> None:
    caller = await new_caller(settings, engine)
    await patch_tenant(client, settings, caller.tenant_id, max_in_flight=1)
    await simulator.configure(latency=0.05, error_kind="job_failed")
    task_id = await submitted(client, caller)
    assert_error(
        await client.post(GENERATIONS, json=CHEAP, headers=caller.auth),
        429,
        "too_many_tasks_in_flight",
    )
    worker, running = start_worker(settings)
    try:
        done = await wait_for_status(client, caller.key, task_id, {"completed", "failed"})
        assert done["status"] == "failed", done
        assert await in_flight(engine, caller.tenant_id) == 0
        again = await submitted(client, caller)
        done = await wait_for_status(client, caller.key, again, {"completed", "failed"})
        assert done["status"] == "failed", done
    finally:
        await stop_worker(worker, running)
    assert await in_flight(engine, caller.tenant_id) == 0


async def test_a_task_the_deadline_sweeper_fails_frees_its_slot(
    settings: Settings, engine: AsyncEngine, simulator: Sim, tmp_path: Path
) -> None:
    swept = own_settings(settings, tmp_path, task_deadline_seconds=5)
    await simulator.configure(latency=30)
    async with app_client(swept) as c:
        caller = await new_caller(swept, engine)
        await patch_tenant(c, swept, caller.tenant_id, max_in_flight=1)
        task_id = await submitted(c, caller)
        worker, running = start_worker(swept)
        try:
            done = await wait_for_status(c, caller.key, task_id, {"completed", "failed"}, wait=20)
        finally:
            await stop_worker(worker, running)
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "timeout"
        assert await in_flight(engine, caller.tenant_id) == 0
        again = await submitted(c, caller)  # the slot is free again
        await fail(engine, again)
    assert await in_flight(engine, caller.tenant_id) == 0


async def test_a_task_whose_worker_died_frees_its_slot_when_another_worker_finishes_it(
    settings: Settings, engine: AsyncEngine, simulator: Sim, redis: Redis, tmp_path: Path
) -> None:
    short = own_settings(settings, tmp_path, lease_seconds=1.0)
    async with app_client(short) as c:
        caller = await new_caller(short, engine)
        await patch_tenant(c, short, caller.tenant_id, max_in_flight=1)
        task_id = await submitted(c, caller)
        # Play the dying worker: claim attempt 0 under a lease, then vanish with its job.
        async with engine.begin() as conn:
            assert await lifecycle.claim(conn, task_id, 0, short.lease_seconds) is not None
        await redis.delete(short.queue_name)
        assert await in_flight(engine, caller.tenant_id) == 1
        assert_error(
            await c.post(GENERATIONS, json=CHEAP, headers=caller.auth),
            429,
            "too_many_tasks_in_flight",
        )
        worker, running = start_worker(short)
        try:
            done = await wait_for_status(c, caller.key, task_id, {"completed", "failed"})
        finally:
            await stop_worker(worker, running)
            await redis.delete(short.queue_name)
        assert done["status"] == "completed", done
        attempt = await scalar(engine, "SELECT attempt FROM tasks WHERE id = :t", t=task_id)
        assert attempt >= 1
    assert await in_flight(engine, caller.tenant_id) == 0


# ---------------------------------------------------------------- model access


async def test_only_models_on_both_the_tenant_and_the_key_list_are_usable(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    caller = await new_caller(settings, engine)
    tenant = await patch_tenant(
        client, settings, caller.tenant_id, allowed_models=["krea-1", "flux-1-pro"]
    )
    assert tenant["allowed_models"] == ["flux-1-pro", "krea-1"]
    key = await patch_key(
        client, settings, caller.key_id, allowed_models=["flux-1-pro", "krea-2-turbo"]
    )
    assert key["allowed_models"] == ["flux-1-pro", "krea-2-turbo"]

    listed = await client.get(MODELS, headers=caller.auth)
    assert [m["id"] for m in listed.json()["data"]] == ["flux-1-pro"]
    task_id = await submitted(client, caller, {"model": "flux-1-pro", "prompt": "allowed"})
    for model in ("krea-1", "krea-2-turbo", "krea-2-medium"):
        denied = await client.post(
            GENERATIONS, json={"model": model, "prompt": "denied"}, headers=caller.auth
        )
        assert_error(denied, 403, "model_access_denied")
        assert denied.json()["error"]["message"] == f"Token does not have access to model: {model}"
    assert (await rows_of(engine, caller.tenant_id))["tasks"] == 1
    await fail(engine, task_id)

    await patch_tenant(client, settings, caller.tenant_id, allowed_models=None)
    await patch_key(client, settings, caller.key_id, allowed_models=None)
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.1)
    listed = await client.get(MODELS, headers=caller.auth)
    assert [m["id"] for m in listed.json()["data"]] == [m.id for m in load_catalog().models]
    await fail(engine, await submitted(client, caller, {"model": "krea-1", "prompt": "all again"}))


async def test_an_unknown_model_in_an_access_list_is_refused_naming_the_field(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    caller = await new_caller(settings, engine)
    for path in (
        f"/admin/tenants/{caller.tenant_id}/limits",
        f"/admin/keys/{caller.key_id}/limits",
    ):
        response = await client.patch(
            path, json={"allowed_models": ["flux-1-pro", "nope"]}, headers=admin(settings)
        )
        message = assert_error(response, 400, "invalid_request", "allowed_models")["message"]
        assert "nope" in message
    key = (await client.get(f"/admin/keys/{caller.key_id}/limits", headers=admin(settings))).json()
    assert key["allowed_models"] is None


# ---------------------------------------------------------------- key budgets


async def test_a_daily_budget_refuses_the_reservation_that_would_cross_it(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    caller = await new_caller(settings, engine)
    shown = await patch_key(client, settings, caller.key_id, budget_daily="0.1554")
    assert shown["budgets"]["daily"]["budget"] == Decimal("0.1554")
    flux = {"model": "flux-1-pro", "prompt": "budget", "n": 1}
    first = await submitted(client, caller, flux)
    second = await submitted(client, caller, flux)

    refused = await client.post(GENERATIONS, json=flux, headers=caller.auth)
    error = assert_error(refused, 402, "key_budget_exceeded", "daily budget of 0.1554 credits")
    message = error["message"]
    assert refused.json()["error"]["type"] == "insufficient_quota"
    assert "0.1554 already reserved" in message
    assert await rows_of(engine, caller.tenant_id) == {"topup": 1, "hold": 2, "tasks": 2}
    assert await in_flight(engine, caller.tenant_id) == 2
    held = await scalar(engine, "SELECT held_micros FROM tenants WHERE id = :t", t=caller.tenant_id)
    assert held == 2 * FLUX_IMAGE

    await fail(engine, first)  # released: its reservation goes back to the budget
    shown = decimals(
        await client.get(f"/admin/keys/{caller.key_id}/limits", headers=admin(settings))
    )
    assert shown["budgets"]["daily"]["spent"] == Decimal("0.0777")
    third = await submitted(client, caller, flux)

    shown = decimals(
        await client.get(f"/admin/keys/{caller.key_id}/limits", headers=admin(settings))
    )
    for period in ("total", "daily", "monthly"):
        assert shown["budgets"][period]["spent"] == Decimal("0.1554")
    assert shown["budgets"]["total"]["budget"] is None
    assert shown["budgets"]["daily"]["period"].startswith("day:")
    for task_id in (second, third):
        await fail(engine, task_id)


async def test_parallel_submissions_never_reserve_past_a_key_budget(
    settings: Settings, client: Client, engine: AsyncEngine, redis: Redis
) -> None:
    caller = await new_caller(settings, engine)
    await patch_key(client, settings, caller.key_id, budget_daily="0.3885")  # 5 × 0.0777
    async with served(settings) as http:
        responses = await asyncio.gather(
            *(
                http.post(
                    GENERATIONS,
                    json={"model": "flux-1-pro", "prompt": f"race {i}", "n": 1},
                    headers=caller.auth,
                )
                for i in range(30)
            )
        )
    assert Counter(r.status_code for r in responses) == {200: 5, 402: 25}
    for refused in (r for r in responses if r.status_code == 402):
        assert_error(refused, 402, "key_budget_exceeded", "daily budget of 0.3885 credits")
    shown = decimals(
        await client.get(f"/admin/keys/{caller.key_id}/limits", headers=admin(settings))
    )
    assert shown["budgets"]["daily"]["spent"] == Decimal("0.3885")
    assert await rows_of(engine, caller.tenant_id) == {"topup": 1, "hold": 5, "tasks": 5}
    for response in responses:
        if response.status_code == 200:
            await fail(engine, response.json()["id"])
    assert await in_flight(engine, caller.tenant_id) == 0


async def test_a_total_budget_takes_a_reservation_exactly_at_it_and_not_one_micro_more(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    exact = await new_caller(settings, engine)
    short = await second_key(client, settings, exact)
    await patch_key(client, settings, exact.key_id, budget_total="0.1554")
    await patch_key(client, settings, short.key_id, budget_total="0.155399")
    two = {"model": "flux-1-pro", "prompt": "edge", "n": 2}  # 0.1554

    task_id = await submitted(client, exact, two)
    refused = await client.post(GENERATIONS, json=two, headers=short.auth)
    assert_error(refused, 402, "key_budget_exceeded", "total budget of 0.155399 credits")
    assert_error(
        await client.post(GENERATIONS, json={**two, "n": 1}, headers=exact.auth),
        402,
        "key_budget_exceeded",
        "total budget",
    )
    shown = decimals(
        await client.get(f"/admin/keys/{exact.key_id}/limits", headers=admin(settings))
    )
    assert shown["budgets"]["total"] == {
        "budget": Decimal("0.1554"),
        "spent": Decimal("0.1554"),
        "period": "total",
    }

    # Settlement gives back what was reserved and not charged: one image of two.
    async with engine.begin() as conn:
        assert await lifecycle.claim(conn, task_id, 0, 30) is not None
        assert await lifecycle.complete(conn, task_id, 0, [f"{task_id}/0.png"], 3600)
    shown = decimals(
        await client.get(f"/admin/keys/{exact.key_id}/limits", headers=admin(settings))
    )
    assert shown["budgets"]["total"]["spent"] == Decimal("0.0777")
    assert await in_flight(engine, exact.tenant_id) == 0

    # A budget of 0 is a budget (nothing may be spent), not "no limit": null removes one.
    await patch_key(client, settings, short.key_id, budget_total="0")
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.1)
    refused = await client.post(GENERATIONS, json={**two, "n": 1}, headers=short.auth)
    assert_error(refused, 402, "key_budget_exceeded", "total budget of 0 credits")


async def test_a_task_open_before_key_budgets_existed_can_still_end(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    caller = await new_caller(settings, engine)
    old = await submitted(client, caller, {"model": "flux-1-pro", "prompt": "before", "n": 1})
    # Right after migration 0003: the open task is in flight, but key_spend is empty.
    async with engine.begin() as conn:
        await conn.execute(
            text("DELETE FROM key_spend WHERE api_key_id = :k"), {"k": caller.key_id}
        )
    new = await submitted(client, caller)  # 0.03 counted after the upgrade
    try:
        async with engine.begin() as conn:
            assert await lifecycle.fail(conn, old, 0, "generation_failed", "ends after upgrade")
    finally:
        # Leave both tasks final, whatever happened: put back what the old task
        # would take away, so that its release can commit.
        async with engine.begin() as conn:
            open_old = await conn.execute(
                text("SELECT 1 FROM tasks WHERE id = :t AND status = 'pending'"), {"t": old}
            )
            if open_old.first() is not None:
                await conn.execute(
                    text(
                        "UPDATE key_spend SET spent_micros = spent_micros + :a "
                        "WHERE api_key_id = :k"
                    ),
                    {"a": FLUX_IMAGE, "k": caller.key_id},
                )
        async with engine.begin() as conn:
            await lifecycle.fail(conn, old, 0, "generation_failed", "cleanup")
            await lifecycle.fail(conn, new, 0, "generation_failed", "cleanup")
    assert await in_flight(engine, caller.tenant_id) == 0


# ---------------------------------------------------------------- the CLI


tollgate = run_cli


async def test_cli_sets_shows_and_resets_limits(settings: Settings, engine: AsyncEngine) -> None:
    caller = await new_caller(settings, engine)
    (code, out, err), (key_code, key_out, key_err) = await asyncio.gather(
        tollgate(
            settings,
            *("limits", "tenant", caller.tenant_id, "--rpm", "10", "--burst", "2"),
            *("--max-in-flight", "1", "--models", "krea-1"),
        ),
        tollgate(settings, "limits", "key", caller.key_id, "--budget-daily", "1.5"),
    )
    assert code == 0, err
    assert key_code == 0, key_err

    (code, out, err), (key_code, key_out, key_err), (bad, _, bad_err) = await asyncio.gather(
        tollgate(settings, "limits", "tenant", caller.tenant_id),
        tollgate(settings, "limits", "key", caller.key_id),
        tollgate(settings, "limits", "tenant", caller.tenant_id, "--models", "nope"),
    )
    assert code == 0, err
    tenant = json.loads(out)
    assert tenant["rate_limit_per_minute"] == {"value": 10, "from": "own"}
    assert tenant["rate_limit_burst"] == {"value": 2, "from": "own"}
    assert tenant["max_in_flight"] == {"value": 1, "from": "own"}
    assert tenant["allowed_models"] == ["krea-1"]
    assert key_code == 0, key_err
    key = json.loads(key_out, parse_float=Decimal)
    assert Decimal(str(key["budgets"]["daily"]["budget"])) == Decimal("1.5")
    assert Decimal(str(key["budgets"]["daily"]["spent"])) == 0
    assert key["budgets"]["total"]["budget"] is None
    assert bad == 1
    assert "allowed_models" in bad_err
    assert "nope" in bad_err

    code, out, err = await tollgate(
        settings, "limits", "tenant", caller.tenant_id, "--rpm", "default"
    )
    assert code == 0, err
    tenant = json.loads(out)
    default_rpm = Settings.model_fields["default_tenant_rate_limit_per_minute"].default
    assert tenant["rate_limit_per_minute"] == {"value": default_rpm, "from": "default"}
    assert tenant["rate_limit_burst"] == {"value": 2, "from": "own"}
    assert tenant["allowed_models"] == ["krea-1"]  # the refused change left the list alone
