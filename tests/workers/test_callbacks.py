"""Callbacks end to end: a task ends, and its final state reaches a real HTTPS receiver.

Each test runs the whole path in this event loop: the app (test client), a
generation worker against the simulator, a callback worker on its own queue,
and a receiver on 127.0.0.1 with a self-signed certificate for
``receiver.test`` (``tests/https_receiver.py``), trusted through
``outbound_ca_bundle``. The callback worker finds hosts through a test
resolver that never asks the system; ``receiver.test`` is let through the
internal-address refusal by ``outbound_allowed_hosts``, and the refusal tests
run with that list empty. Nothing connects anywhere but loopback.

The full retry schedule (1, 2 and 4 s) is slow, so its two scenarios run once,
side by side, in the module fixture ``schedule_run`` that three tests read.
"""

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from arq.constants import job_key_prefix
from arq.worker import Worker
from conftest import (
    Sim,
    bearer,
    make_settings,
    make_tenant_key,
    start_worker,
    stop_worker,
)
from https_receiver import (
    HOST,
    LOOPBACK,
    OK,
    Answer,
    Arrival,
    Cert,
    FakeResolver,
    LoopbackOnlyBackend,
    Receiver,
    failing,
)
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import outbound
from gateway.app import create_app
from gateway.callbacks.service import deliveries as deliveries_table
from gateway.db import create_engine
from gateway.redis_keys import callback_job_id
from gateway.settings import Settings
from workers.callbacks import Batches
from workers.main import create_callback_worker

Client = AsyncTestClient[Any]
Delivery = dict[str, Any]

MODEL = "krea-2-turbo"
PUBLIC = "93.184.216.34"  # only ever a test resolver's answer: never contacted
GAP_TOLERANCE = 0.3


# --- Running the whole path ------------------------------------------------


def callback_settings(
    database_url: str, simulator_url: str, folder: Path, cert: Cert, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "callback_queue_name": f"tollgate:test-cb:{uuid.uuid4().hex}",
        "outbound_allowed_hosts": [HOST],
        "outbound_ca_bundle": cert.cert,
    }
    values.update(overrides)
    return make_settings(database_url, simulator_url, folder / "storage", **values)


def start_callback_worker(
    settings: Settings, resolver: FakeResolver
) -> tuple[Worker, "asyncio.Task[None]"]:
    """The callback worker in this event loop, looking hosts up with ``resolver``."""
    worker = create_callback_worker(settings, handle_signals=False)
    startup = worker.on_startup
    assert startup is not None

    async def startup_with_resolver(ctx: dict[str, Any]) -> None:
        await startup(ctx)
        ctx["callback_deps"].resolver = resolver

    worker.on_startup = startup_with_resolver
    return worker, asyncio.create_task(worker.async_run())


@dataclass
class Stack:
    """The app, a generation worker and a callback worker, with one tenant to drive them."""

    settings: Settings
    client: Client
    engine: AsyncEngine
    redis: Redis
    resolver: FakeResolver
    tenant_id: str
    key: str
    tenants: list[str] = field(default_factory=list)
    callbacks: tuple[Worker, "asyncio.Task[None]"] | None = None

    def start_callbacks(self) -> None:
        assert self.callbacks is None
        self.callbacks = start_callback_worker(self.settings, self.resolver)

    async def stop_callbacks(self) -> None:
        if self.callbacks is not None:
            await stop_worker(*self.callbacks)
            self.callbacks = None

    async def new_tenant(self) -> tuple[str, str]:
        tenant_id, key = await make_tenant_key(self.settings)
        self.tenants.append(tenant_id)
        return tenant_id, key

    async def submit(
        self, callback_url: str | None = None, *, header: str | None = None, prompt: str = "x"
    ) -> str:
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt}
        if callback_url is not None:
            body["callback_url"] = callback_url
        headers = bearer(self.key)
        if header is not None:
            headers["X-Webhook-URL"] = header
        response = await self.client.post("/v1/images/generations", json=body, headers=headers)
        assert response.status_code == 200, response.text
        task_id: str = response.json()["id"]
        return task_id

    async def task_bytes(self, task_id: str) -> bytes:
        response = await self.client.get(f"/v1/tasks/{task_id}", headers=bearer(self.key))
        assert response.status_code == 200, response.text
        return response.content

    async def secret(self) -> str:
        response = await self.client.get("/v1/webhooks/secret", headers=bearer(self.key))
        assert response.status_code == 200, response.text
        secret: str = response.json()["secret"]
        return secret

    async def deliveries(self, task_id: str) -> list[Delivery]:
        response = await self.client.get(
            f"/v1/tasks/{task_id}/deliveries", headers=bearer(self.key)
        )
        assert response.status_code == 200, response.text
        data: list[Delivery] = response.json()["data"]
        return data

    async def wait_deliveries(
        self, task_id: str, done: Callable[[list[Delivery]], bool], within: float = 20
    ) -> list[Delivery]:
        found: list[Delivery] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = await self.deliveries(task_id)
            if done(found):
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"deliveries of {task_id} did not get there: {found}")

    async def wait_final(self, task_id: str, count: int = 1, within: float = 20) -> list[Delivery]:
        """The task's ``count`` deliveries, once none is pending."""
        return await self.wait_deliveries(
            task_id,
            lambda found: len(found) == count and all(d["status"] != "pending" for d in found),
            within,
        )

    async def wait_attempts(self, task_id: str, attempts: int, within: float = 20) -> Delivery:
        """The task's one delivery, once ``attempts`` of its attempts are recorded."""
        [delivery] = await self.wait_deliveries(
            task_id,
            lambda found: len(found) == 1 and len(found[0]["attempts"]) >= attempts,
            within,
        )
        return delivery


async def give_up_pending(stack: Stack) -> None:
    """End what a test left pending, so no later test's reconciler picks it up."""
    async with stack.engine.begin() as conn:
        left = await conn.execute(
            update(deliveries_table)
            .where(
                deliveries_table.c.tenant_id.in_(stack.tenants),
                deliveries_table.c.status == "pending",
            )
            .values(status="failed", next_attempt_at=None)
            .returning(deliveries_table.c.id)
        )
        ids = [row[0] for row in left]
    for delivery_id in ids:
        await stack.redis.delete(
            *(job_key_prefix + callback_job_id(delivery_id, n) for n in range(1, 6))
        )


@contextlib.asynccontextmanager
async def running(settings: Settings, resolver: FakeResolver) -> AsyncIterator[Stack]:
    engine = create_engine(settings)
    redis = Redis.from_url(settings.redis_url)
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        tenant_id, key = await make_tenant_key(settings)
        stack = Stack(settings, c, engine, redis, resolver, tenant_id, key, [tenant_id])
        generation = start_worker(settings)
        stack.start_callbacks()
        try:
            yield stack
        finally:
            await stop_worker(*generation)
            await stack.stop_callbacks()
            await give_up_pending(stack)
            await redis.delete(settings.queue_name, settings.callback_queue_name)
            await redis.aclose()
            await engine.dispose()


StartStack = Callable[..., contextlib.AbstractAsyncContextManager[Stack]]


@pytest.fixture
def start_stack(
    database_url: str, simulator_url: str, simulator: Sim, tmp_path: Path, cert: Cert
) -> StartStack:
    """``start_stack(resolver=None, **settings)``: the stack under these settings."""

    @contextlib.asynccontextmanager
    async def start(resolver: FakeResolver | None = None, **overrides: Any) -> AsyncIterator[Stack]:
        await simulator.configure(latency=0.1)
        settings = callback_settings(database_url, simulator_url, tmp_path, cert, **overrides)
        async with running(settings, resolver or FakeResolver({HOST: [[LOOPBACK]]})) as stack:
            yield stack

    return start


@pytest.fixture
async def stack(start_stack: StartStack) -> AsyncIterator[Stack]:
    async with start_stack() as started:
        yield started


def verify(secret: str, arrival: Arrival) -> Any:
    """The parsed body if the Standard Webhooks signature is good (raises otherwise)."""
    return standardwebhooks.Webhook(secret).verify(arrival.body, arrival.headers)


async def ledger_kinds(engine: AsyncEngine, task_id: str) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT kind FROM ledger_entries WHERE task_id = :task ORDER BY id"),
            {"task": task_id},
        )
        return [row[0] for row in rows]


# --- The full schedule: 4 attempts, 1, 2 and 4 s apart ----------------------


@dataclass
class ScheduleRun:
    secret: str
    flaky_task: bytes  # GET /v1/tasks/{id} of the task whose receiver fails 3 times
    dead_task: bytes  # ... and of the one whose receiver always fails
    flaky: list[Arrival]
    dead: list[Arrival]
    flaky_log: list[Delivery]
    dead_log: list[Delivery]


@pytest.fixture(scope="module")
async def schedule_run(
    database_url: str, simulator_url: str, tmp_path_factory: pytest.TempPathFactory, cert: Cert
) -> ScheduleRun:
    """Two deliveries through the whole schedule at once: one succeeds at the 4th try, one never."""
    sim = Sim(simulator_url)
    await sim.reset()
    await sim.configure(latency=0.1)
    folder = tmp_path_factory.mktemp("schedule")
    settings = callback_settings(database_url, simulator_url, folder, cert)
    receiver = Receiver(cert)
    await receiver.start()
    try:
        async with running(settings, FakeResolver({HOST: [[LOOPBACK]]})) as stack:
            flaky = await stack.submit(receiver.script("/flaky", failing(3)))
            dead = await stack.submit(receiver.script("/dead", [Answer(500)]))
            flaky_log = await stack.wait_final(flaky)
            await stack.wait_final(dead)
            await asyncio.sleep(2)  # a fifth attempt, if any, would have come by now
            run = ScheduleRun(
                secret=await stack.secret(),
                flaky_task=await stack.task_bytes(flaky),
                dead_task=await stack.task_bytes(dead),
                flaky=receiver.at("/flaky"),
                dead=receiver.at("/dead"),
                flaky_log=flaky_log,
                dead_log=await stack.deliveries(dead),
            )
    finally:
        await receiver.close()
        await sim.reset()
    return run


def test_a_failing_receiver_is_retried_after_1_2_and_4_seconds_then_delivered(
    schedule_run: ScheduleRun,
) -> None:
    arrivals = schedule_run.flaky
    assert len(arrivals) == 4
    gaps = [later.at - earlier.at for earlier, later in pairwise(arrivals)]
    assert gaps == pytest.approx([1, 2, 4], abs=GAP_TOLERANCE)

    [delivery] = schedule_run.flaky_log
    assert {arrival.headers["webhook-id"] for arrival in arrivals} == {delivery["id"]}
    assert delivery["status"] == "delivered"
    assert delivery["finished_at"] is not None
    assert delivery["next_attempt_at"] is None
    attempts = delivery["attempts"]
    assert [a["number"] for a in attempts] == [1, 2, 3, 4]
    assert [a["status_code"] for a in attempts] == [500, 500, 500, 200]
    assert [a["error"] for a in attempts] == ["HTTP 500", "HTTP 500", "HTTP 500", None]
    assert [a["succeeded"] for a in attempts] == [False, False, False, True]


def test_every_attempt_sends_the_task_object_bytes_signed_with_the_tenant_secret(
    schedule_run: ScheduleRun,
) -> None:
    for arrival in schedule_run.flaky:
        assert arrival.body == schedule_run.flaky_task
    for arrival in schedule_run.dead:
        assert arrival.body == schedule_run.dead_task
    for arrival in schedule_run.flaky + schedule_run.dead:
        assert arrival.headers["content-type"] == "application/json"
        assert abs(int(arrival.headers["webhook-timestamp"]) - time.time()) < 60
        assert verify(schedule_run.secret, arrival)["status"] == "completed"
    wrong = "whsec_" + "A" * 43 + "="
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify(wrong, schedule_run.flaky[0])


def test_a_receiver_that_always_fails_gets_four_attempts_then_the_delivery_is_given_up(
    schedule_run: ScheduleRun,
) -> None:
    assert len(schedule_run.dead) == 4  # and no fifth, 2 s after the last
    [delivery] = schedule_run.dead_log
    assert delivery["status"] == "failed"
    assert delivery["finished_at"] is not None
    assert delivery["next_attempt_at"] is None
    assert [a["status_code"] for a in delivery["attempts"]] == [500] * 4
    assert not any(a["succeeded"] for a in delivery["attempts"])
    gaps = [later.at - earlier.at for earlier, later in pairwise(schedule_run.dead)]
    assert gaps == pytest.approx([1, 2, 4], abs=GAP_TOLERANCE)


# --- Batches: the attempts in hand share their statements ------------------


async def test_calls_that_arrive_while_a_batch_is_out_go_together_in_the_next() -> None:
    sent: list[list[int]] = []
    release = asyncio.Event()

    async def send(items: list[int]) -> list[int]:
        sent.append(items)
        await release.wait()
        if 4 in items:
            raise RuntimeError("the statement failed")
        return [item * 10 for item in items]

    batches: Batches[int, int] = Batches(send, limit=2)
    calls = [asyncio.create_task(batches(n)) for n in range(1, 6)]
    await asyncio.sleep(0.01)
    assert sent == [[1, 2]]  # one batch out, the rest waiting
    release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)

    assert sent == [[1, 2], [3, 4], [5]]
    assert results[:2] == [10, 20]
    assert [str(r) for r in results[2:4]] == ["the statement failed"] * 2  # its whole batch
    assert results[4] == 50
    assert batches.batches == 3
    await batches.close()


async def test_deliveries_waiting_together_are_claimed_and_recorded_in_shared_statements(
    stack: Stack, receiver: Receiver
) -> None:
    await stack.stop_callbacks()
    tasks = [await stack.submit(receiver.script(f"/many/{n}", [OK])) for n in range(8)]
    for task_id in tasks:  # each ended, its delivery queued for the stopped worker
        await stack.wait_deliveries(task_id, lambda found: len(found) == 1, 20)
    stack.start_callbacks()
    for task_id in tasks:
        [delivery] = await stack.wait_final(task_id)
        assert delivery["status"] == "delivered"
    assert stack.callbacks is not None
    deps = stack.callbacks[0].ctx["callback_deps"]

    secret = await stack.secret()
    for n, task_id in enumerate(tasks):
        [arrival] = receiver.at(f"/many/{n}")
        assert arrival.body == await stack.task_bytes(task_id)
        assert verify(secret, arrival)["id"] == task_id
    assert deps.claims.batches < len(tasks)
    assert deps.records.batches < len(tasks)


# --- One attempt, slow receivers, redirects ---------------------------------


async def test_a_receiver_that_answers_200_gets_exactly_one_attempt(
    stack: Stack, receiver: Receiver
) -> None:
    task_id = await stack.submit(receiver.script("/once", [Answer(204)]))
    [delivery] = await stack.wait_final(task_id)
    await asyncio.sleep(1.3)  # past the first retry's gap

    assert len(receiver.at("/once")) == 1
    assert delivery["status"] == "delivered"
    [attempt] = (await stack.deliveries(task_id))[0]["attempts"]
    assert (attempt["status_code"], attempt["error"], attempt["succeeded"]) == (204, None, True)


async def test_a_receiver_slower_than_the_timeout_fails_the_attempt_and_is_retried(
    start_stack: StartStack, receiver: Receiver
) -> None:
    async with start_stack(callback_timeout_seconds=1.5) as stack:
        task_id = await stack.submit(receiver.script("/slow", [Answer(delay=5), OK]))
        [delivery] = await stack.wait_final(task_id)

    first, second = delivery["attempts"]
    assert first["status_code"] is None
    assert not first["succeeded"]
    assert "Timeout" in first["error"], first["error"]
    assert 1400 <= first["duration_ms"] < 2500
    assert second["succeeded"]
    assert delivery["status"] == "delivered"
    slow, fast = receiver.at("/slow")
    assert fast.at - slow.at == pytest.approx(1.5 + 1, abs=GAP_TOLERANCE + 0.2)


def test_the_callback_timeout_is_10_seconds_unless_set(
    database_url: str, simulator_url: str, tmp_path: Path
) -> None:
    assert Settings.model_fields["callback_timeout_seconds"].default == 10.0
    settings = make_settings(database_url, simulator_url, tmp_path)
    assert settings.callback_timeout_seconds == 10.0


async def test_a_redirect_is_not_followed_and_counts_as_a_failure(
    stack: Stack, receiver: Receiver, cert: Cert
) -> None:
    elsewhere = Receiver(cert)
    await elsewhere.start()
    try:
        moved = Answer(302, location=elsewhere.url("/elsewhere"))
        task_id = await stack.submit(receiver.script("/moved", [moved, OK]))
        [delivery] = await stack.wait_final(task_id)
    finally:
        await elsewhere.close()

    first, second = delivery["attempts"]
    assert (first["status_code"], first["error"], first["succeeded"]) == (302, "HTTP 302", False)
    assert second["succeeded"]
    assert len(receiver.at("/moved")) == 2
    assert elsewhere.connections == 0
    assert elsewhere.arrivals == []


# --- Refused URLs: at submit, and at delivery --------------------------------

SUBMIT_REFUSED = [
    ("https://127.0.0.1/", "loopback"),
    ("https://2130706433/", "loopback"),
    ("https://0x7f.1/", "loopback"),
    ("https://017700000001/", "loopback"),
    ("https://[::1]/", "loopback"),
    ("https://[::ffff:127.0.0.1]/", "loopback address in IPv4-mapped form"),
    ("https://169.254.169.254/", "link-local (cloud metadata)"),
    ("https://10.0.0.1/", "private"),
    ("https://100.64.0.1/", "shared"),
    ("http://example.com/hook", "must be an https:// URL"),
    ("https://example.com/" + "a" * 2029, "must be at most 2048 characters"),
    ("https://[64:ff9b::7f00:1]/", "loopback address in NAT64 form"),
    ("https://user:pw@example.com/", "must not contain a user name or password"),
]
assert len(SUBMIT_REFUSED[10][0]) == 2049


@pytest.mark.parametrize("field_name", ["callback_url", "X-Webhook-URL"])
@pytest.mark.parametrize(
    ("url", "words"),
    SUBMIT_REFUSED,
    ids=[url if len(url) < 100 else "2049-characters" for url, _ in SUBMIT_REFUSED],
)
async def test_submit_refuses_an_internal_or_malformed_url_naming_the_field(
    client: Client, tenant_key: tuple[str, str], url: str, words: str, field_name: str
) -> None:
    _, key = tenant_key
    body: dict[str, Any] = {"model": MODEL, "prompt": "x"}
    headers = bearer(key)
    if field_name == "callback_url":
        body["callback_url"] = url
    else:
        headers["X-Webhook-URL"] = url
    response = await client.post("/v1/images/generations", json=body, headers=headers)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"{field_name}: "), error["message"]
    assert words in error["message"]


async def test_a_name_that_resolves_to_loopback_is_refused_at_delivery_without_a_connection(
    start_stack: StartStack, receiver: Receiver
) -> None:
    # The receiver stands for the internal service: 127.0.0.1, at the URL's port.
    resolver = FakeResolver({"evil.test": [[LOOPBACK]]})
    async with start_stack(resolver, outbound_allowed_hosts=[]) as stack:
        task_id = await stack.submit(receiver.url("/hook", host="evil.test"))
        delivery = await stack.wait_attempts(task_id, 1)
        lookups = list(resolver.lookups)

    first = delivery["attempts"][0]
    assert first["error"] == (
        "refused: must not point at an internal address: evil.test resolves to a loopback address"
    )
    assert (first["status_code"], first["succeeded"]) == (None, False)
    assert lookups[:1] == ["evil.test"]
    assert receiver.connections == 0


async def test_a_rebinding_name_is_looked_up_once_per_attempt_and_never_reaches_loopback(
    start_stack: StartStack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # First answer public, second loopback. The public address is only recorded:
    # the backend the guard connects through opens sockets to loopback alone.
    backend = LoopbackOnlyBackend()
    guarded = functools.partial(outbound.GuardedClient, network_backend=backend)
    monkeypatch.setattr(outbound, "GuardedClient", guarded)
    resolver = FakeResolver({"rebind.test": [[PUBLIC], [LOOPBACK]]})
    async with start_stack(resolver, outbound_allowed_hosts=[]) as stack:
        task_id = await stack.submit(receiver.url("/hook", host="rebind.test"))
        await stack.wait_attempts(task_id, 1)
        lookups_in_first = list(resolver.lookups)
        connects_in_first = list(backend.elsewhere)
        delivery = await stack.wait_attempts(task_id, 2)
        lookups_in_two = list(resolver.lookups)

    # One lookup per attempt: the connection went where the checked answer said.
    assert lookups_in_first == ["rebind.test"]
    assert connects_in_first == [(PUBLIC, receiver.port)]
    assert lookups_in_two == ["rebind.test", "rebind.test"]
    first, second = delivery["attempts"][:2]
    assert first["error"].startswith("ConnectError: "), first["error"]
    assert second["error"] == (
        "refused: must not point at an internal address: rebind.test resolves to a loopback address"
    )
    assert backend.elsewhere == [(PUBLIC, receiver.port)]
    assert receiver.connections == 0


# --- What is sent, and when ------------------------------------------------


async def test_the_x_webhook_url_header_is_accepted_as_the_callback(
    stack: Stack, receiver: Receiver
) -> None:
    url = receiver.script("/header", [OK])
    task_id = await stack.submit(header=url)
    [delivery] = await stack.wait_final(task_id)

    assert (delivery["url"], delivery["status"]) == (url, "delivered")
    [arrival] = receiver.at("/header")
    assert arrival.body == await stack.task_bytes(task_id)
    assert verify(await stack.secret(), arrival)["id"] == task_id


async def test_the_callback_is_sent_only_after_the_charge_is_captured(
    stack: Stack, receiver: Receiver
) -> None:
    at_arrival: list[list[str]] = []

    async def read_ledger(arrival: Arrival) -> None:
        at_arrival.append(await ledger_kinds(stack.engine, json.loads(arrival.body)["id"]))

    receiver.on_arrival = read_ledger
    task_id = await stack.submit(receiver.script("/billed", [OK]))
    await stack.wait_final(task_id)

    [arrival] = receiver.at("/billed")
    sent = json.loads(arrival.body)
    assert sent["status"] == "completed"
    assert float(sent["usage"]["credits_charged"]) > 0
    assert sent["usage"] == json.loads(await stack.task_bytes(task_id))["usage"]
    assert len(at_arrival) == 1
    assert "capture" in at_arrival[0], at_arrival


async def test_a_task_that_fails_upstream_sends_one_failed_callback_after_the_release(
    stack: Stack, receiver: Receiver, simulator: Sim
) -> None:
    await simulator.configure(error_kind="job_failed")
    at_arrival: list[list[str]] = []

    async def read_ledger(arrival: Arrival) -> None:
        at_arrival.append(await ledger_kinds(stack.engine, json.loads(arrival.body)["id"]))

    receiver.on_arrival = read_ledger
    task_id = await stack.submit(receiver.script("/failed", [OK]))
    [delivery] = await stack.wait_final(task_id)
    await asyncio.sleep(1.3)  # no second delivery or retry follows

    [arrival] = receiver.at("/failed")
    assert arrival.body == await stack.task_bytes(task_id)
    sent = verify(await stack.secret(), arrival)
    assert sent["status"] == "failed"
    assert sent["error"]["code"] == "generation_failed"
    assert float(sent["usage"]["credits_charged"]) == 0
    assert delivery["status"] == "delivered"
    assert len(await stack.deliveries(task_id)) == 1
    assert at_arrival == [["hold", "release"]]


# --- A retry survives the worker and Redis ----------------------------------


async def test_a_retry_due_while_no_worker_runs_is_delivered_by_the_next_worker(
    stack: Stack, receiver: Receiver
) -> None:
    task_id = await stack.submit(receiver.script("/restart", failing(1)))
    first = await stack.wait_attempts(task_id, 1)
    await stack.stop_callbacks()

    job = callback_job_id(first["id"], 2)
    assert await stack.redis.zscore(stack.settings.callback_queue_name, job) is not None
    await asyncio.sleep(1.5)  # past the 1 s gap, with no worker running
    assert len(receiver.at("/restart")) == 1

    started = time.monotonic()
    stack.start_callbacks()
    arrivals = await receiver.wait_for("/restart", 2, within=10)
    [delivery] = await stack.wait_final(task_id)

    assert arrivals[1].at - started < 2
    assert arrivals[1].headers["webhook-id"] == arrivals[0].headers["webhook-id"] == first["id"]
    assert delivery["status"] == "delivered"
    assert [a["succeeded"] for a in delivery["attempts"]] == [False, True]


async def test_a_retry_redis_lost_is_queued_again_from_postgres(
    stack: Stack, receiver: Receiver
) -> None:
    task_id = await stack.submit(receiver.script("/lost", failing(1)))
    first = await stack.wait_attempts(task_id, 1)
    await stack.stop_callbacks()

    # Redis loses the queue: no job remains for the retry anywhere.
    job = callback_job_id(first["id"], 2)
    assert await stack.redis.delete(stack.settings.callback_queue_name) == 1
    assert await stack.redis.delete(job_key_prefix + job) == 1
    await asyncio.sleep(1.5)  # the retry is now overdue in PostgreSQL
    assert len(receiver.at("/lost")) == 1

    stack.start_callbacks()
    arrivals = await receiver.wait_for("/lost", 2, within=10)
    [delivery] = await stack.wait_final(task_id)

    assert arrivals[1].headers["webhook-id"] == first["id"]
    assert delivery["status"] == "delivered"
    assert [a["number"] for a in delivery["attempts"]] == [1, 2]


# --- Redelivery, isolation, operators, rotation -----------------------------


async def test_redelivery_sends_the_task_again_under_a_new_webhook_id(
    stack: Stack, receiver: Receiver
) -> None:
    task_id = await stack.submit(receiver.script("/again", [OK]))
    [first] = await stack.wait_final(task_id)

    response = await stack.client.post(f"/v1/tasks/{task_id}/deliveries", headers=bearer(stack.key))
    assert response.status_code == 202, response.text
    made = response.json()
    assert made["status"] == "pending"
    assert made["id"] != first["id"]
    once, again = await receiver.wait_for("/again", 2)
    log = await stack.wait_final(task_id, count=2)

    assert (once.headers["webhook-id"], again.headers["webhook-id"]) == (first["id"], made["id"])
    assert again.body == once.body == await stack.task_bytes(task_id)
    assert [(d["id"], d["status"]) for d in log] == [
        (first["id"], "delivered"),
        (made["id"], "delivered"),
    ]


async def test_another_tenant_cannot_see_or_redeliver_a_tasks_callbacks(
    stack: Stack, receiver: Receiver
) -> None:
    task_id = await stack.submit(receiver.script("/mine", [OK]))
    [delivery] = await stack.wait_final(task_id)
    _, other = await stack.new_tenant()

    listed = await stack.client.get(f"/v1/tasks/{task_id}/deliveries", headers=bearer(other))
    again = await stack.client.post(f"/v1/tasks/{task_id}/deliveries", headers=bearer(other))

    assert listed.status_code == 404, listed.text
    assert again.status_code == 404, again.text
    assert delivery["id"] not in listed.text
    assert len(await stack.deliveries(task_id)) == 1
    await asyncio.sleep(0.3)
    assert len(receiver.at("/mine")) == 1


async def test_redelivery_of_a_task_without_a_callback_url_is_a_conflict(stack: Stack) -> None:
    task_id = await stack.submit()
    deadline = time.monotonic() + 20
    while json.loads(await stack.task_bytes(task_id))["status"] != "completed":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)

    response = await stack.client.post(f"/v1/tasks/{task_id}/deliveries", headers=bearer(stack.key))
    assert response.status_code == 409, response.text
    assert await stack.deliveries(task_id) == []


async def test_operators_list_and_redeliver_any_tasks_callbacks(
    stack: Stack, receiver: Receiver
) -> None:
    admin = bearer(stack.settings.admin_token)
    task_id = await stack.submit(receiver.script("/ops", [OK]))
    [first] = await stack.wait_final(task_id)

    listed = await stack.client.get(f"/admin/tasks/{task_id}/deliveries", headers=admin)
    assert listed.status_code == 200, listed.text
    assert listed.json()["data"] == await stack.deliveries(task_id)
    made = await stack.client.post(f"/admin/tasks/{task_id}/deliveries", headers=admin)
    assert made.status_code == 202, made.text
    _, again = await receiver.wait_for("/ops", 2)
    log = await stack.wait_final(task_id, count=2)

    assert again.headers["webhook-id"] == made.json()["id"] != first["id"]
    assert [d["status"] for d in log] == ["delivered", "delivered"]
    missing = await stack.client.get("/admin/tasks/task_missing/deliveries", headers=admin)
    assert missing.status_code == 404
    tenant_key = await stack.client.get(
        f"/admin/tasks/{task_id}/deliveries", headers=bearer(stack.key)
    )
    assert tenant_key.status_code in (401, 403)


async def test_a_rotated_secret_signs_the_next_delivery_and_the_old_one_no_longer_verifies(
    stack: Stack, receiver: Receiver
) -> None:
    old = await stack.secret()
    task_id = await stack.submit(receiver.script("/rotate", [OK]))
    await stack.wait_final(task_id)

    rotated = await stack.client.post("/v1/webhooks/secret/rotate", headers=bearer(stack.key))
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old
    assert await stack.secret() == new
    response = await stack.client.post(f"/v1/tasks/{task_id}/deliveries", headers=bearer(stack.key))
    assert response.status_code == 202, response.text
    before, after = await receiver.wait_for("/rotate", 2)

    assert verify(old, before)["id"] == task_id
    assert verify(new, after)["id"] == task_id
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify(old, after)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify(new, before)
