"""The generation job against the simulator over HTTP, with real PostgreSQL and Redis."""

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from arq.connections import RedisSettings, create_pool
from conftest import Sim, bearer, make_settings, start_worker, stop_worker, wait_for_status
from litestar.testing import AsyncTestClient
from sqlalchemy import text

from gateway.db import create_engine
from gateway.settings import Settings
from gateway.storage import LocalStorage
from gateway.tasks import lifecycle
from pricing.catalog import load_catalog
from pricing.request import ImageRequest
from workers.deps import WorkerDeps
from workers.generate import generate_task
from workers.routing import Directory
from workers.simulator.png import png_size

Client = AsyncTestClient[Any]


async def submit(client: Client, key: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/images/generations", json=body, headers=bearer(key))
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


async def download(client: Client, url: str) -> Any:
    parts = urlsplit(url)
    return await client.get(f"{parts.path}?{parts.query}")


class Deps:
    """Worker dependencies built by hand, to run the job function directly."""

    def __init__(self, settings: Settings) -> None:
        self.http = httpx.AsyncClient(trust_env=False)
        self.engine = create_engine(settings)
        catalog = load_catalog()
        self.value = WorkerDeps(
            settings=settings,
            catalog=catalog,
            engine=self.engine,
            storage=LocalStorage(settings.storage_dir),
            http=self.http,
            directory=Directory(settings, catalog, self.engine, self.http),
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.engine.dispose()


@pytest.fixture
async def deps(settings: Settings) -> Any:
    built = Deps(settings)
    yield built.value
    await built.close()


@pytest.mark.usefixtures("worker")
async def test_task_completes_with_images_of_the_requested_size(
    client: Client, tenant_key: tuple[str, str], simulator: Sim
) -> None:
    _, key = tenant_key
    task = await submit(
        client, key, {"model": "krea-2-turbo", "prompt": "a lighthouse", "size": "16:9"}
    )
    done = await wait_for_status(client, key, task["id"], {"completed", "failed"})
    assert done["status"] == "completed", done
    assert done["progress"] == 100
    assert len(done["results"]) == 4  # krea-2-turbo: four images per generation
    assert done["expires_at"] > done["created"]
    for url in done["results"]:
        assert url.startswith("http://testserver.local/v1/files/")
        assert "127.0.0.1" not in url
        response = await download(client, url)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert png_size(response.content) == (1344, 768)
    assert (await simulator.stats())["submits"] == 1


@pytest.mark.usefixtures("worker")
async def test_transient_submit_failures_are_retried(
    client: Client, tenant_key: tuple[str, str], simulator: Sim
) -> None:
    _, key = tenant_key
    await simulator.configure(fail_first_n=2)
    task = await submit(client, key, {"model": "krea-2-medium", "prompt": "retry me"})
    done = await wait_for_status(client, key, task["id"], {"completed", "failed"})
    assert done["status"] == "completed", done
    assert (await simulator.stats())["submits"] == 3


@pytest.mark.parametrize(
    ("knobs", "code"),
    [
        ({"error_kind": "job_failed"}, "generation_failed"),
        ({"error_kind": "submit_500"}, "upstream_unavailable"),
        ({"error_kind": "malformed"}, "upstream_bad_response"),
        ({"error_kind": "bad_image"}, "upstream_bad_result"),
    ],
)
@pytest.mark.usefixtures("worker")
async def test_upstream_failures_fail_the_task_in_tollgates_words(
    client: Client,
    tenant_key: tuple[str, str],
    simulator: Sim,
    settings: Settings,
    knobs: dict[str, Any],
    code: str,
) -> None:
    _, key = tenant_key
    await simulator.configure(**knobs)
    task = await submit(client, key, {"model": "krea-2-large", "prompt": "fail me"})
    done = await wait_for_status(client, key, task["id"], {"completed", "failed"}, wait=30)
    assert done["status"] == "failed"
    assert done["error"]["code"] == code
    message = done["error"]["message"]
    for leak in (simulator.url, "127.0.0.1", "sim-test-key", "Traceback"):
        assert leak not in message
    assert "results" not in done


@pytest.fixture
def fast_settings(database_url: str, simulator_url: str, tmp_path: Path) -> Settings:
    return make_settings(
        database_url,
        simulator_url,
        tmp_path / "storage",
        upstream_retry_base_seconds=0.05,
        lease_seconds=1.0,
        requeue_pending_after_seconds=0.5,
    )


async def create_task(client: Client, key: str, body: dict[str, Any]) -> str:
    return (await submit(client, key, body))["id"]


async def test_the_same_job_run_twice_at_once_generates_once(
    settings: Settings, client: Client, tenant_key: tuple[str, str], simulator: Sim, deps: Any
) -> None:
    _, key = tenant_key
    task_id = await create_task(client, key, {"model": "krea-2-medium", "prompt": "twice"})
    outcomes = await asyncio.gather(
        generate_task({"deps": deps}, task_id, 0), generate_task({"deps": deps}, task_id, 0)
    )
    assert sorted(o.split(":")[0] for o in outcomes) == ["completed", "skipped"]
    again = await generate_task({"deps": deps}, task_id, 0)
    assert again.startswith("skipped")
    assert (await simulator.stats())["submits"] == 1
    done = await wait_for_status(client, key, task_id, {"completed"})
    assert len(done["results"]) == 1


async def test_a_stale_attempt_writes_nothing(
    settings: Settings, client: Client, tenant_key: tuple[str, str], simulator: Sim, deps: Any
) -> None:
    _, key = tenant_key
    task_id = await create_task(client, key, {"model": "krea-2-medium", "prompt": "stale"})
    async with deps.engine.begin() as conn:
        await conn.execute(text("UPDATE tasks SET attempt = 1 WHERE id = :id"), {"id": task_id})
    assert (await generate_task({"deps": deps}, task_id, 0)).startswith("skipped")
    assert (await simulator.stats())["submits"] == 0
    assert (await generate_task({"deps": deps}, task_id, 1)).startswith("completed")


async def test_a_fresh_job_that_reads_nothing_before_its_slot_is_still_fenced(
    settings: Settings, client: Client, tenant_key: tuple[str, str], simulator: Sim, deps: Any
) -> None:
    """A just-submitted task's job carries its model and ticket, and its first delivery
    does not read the task before its slot: the claim alone keeps out a stale attempt and
    an ended task."""
    _, key = tenant_key
    body = {"model": "krea-2-medium", "prompt": "fresh"}
    stale = await create_task(client, key, body)
    async with deps.engine.begin() as conn:
        await conn.execute(text("UPDATE tasks SET attempt = 1 WHERE id = :id"), {"id": stale})
    ctx = {"deps": deps, "job_try": 1}
    assert (await generate_task(ctx, stale, 0, body["model"], 1)).startswith("skipped")
    ended = await create_task(client, key, body)
    cancelled = await client.post(f"/v1/tasks/{ended}/cancel", headers=bearer(key))
    assert cancelled.status_code == 200, cancelled.text
    assert (await generate_task(ctx, ended, 0, body["model"], 1)).startswith("skipped")
    assert (await simulator.stats())["submits"] == 0
    assert (await generate_task(ctx, stale, 1, body["model"], 1)).startswith("completed")


async def test_reconciler_requeues_a_task_whose_job_redis_lost(
    fast_settings: Settings, simulator: Sim, tenant_key: tuple[str, str]
) -> None:
    from gateway.app import create_app

    settings = fast_settings
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        _, key = tenant_key
        task_id = await create_task(c, key, {"model": "krea-2-medium", "prompt": "lost"})
        redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
        try:
            # Redis loses the queue: no job remains for this task anywhere.
            assert await redis.delete(settings.queue_name) == 1
            await redis.delete(f"arq:job:gen:{task_id}:0")
        finally:
            await redis.aclose()
        worker, running = start_worker(settings)
        try:
            done = await wait_for_status(c, key, task_id, {"completed", "failed"})
        finally:
            await stop_worker(worker, running)
        assert done["status"] == "completed"


async def test_a_reclaimed_task_whose_enqueue_was_lost_is_queued_again(
    fast_settings: Settings, simulator: Sim, tenant_key: tuple[str, str]
) -> None:
    """The reconciler handed the task to attempt 1, then died before queueing it."""
    from gateway.app import create_app

    settings = fast_settings
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        _, key = tenant_key
        task_id = await create_task(c, key, {"model": "krea-2-medium", "prompt": "reclaimed"})
        redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
        engine = create_engine(settings)
        try:
            await redis.delete(settings.queue_name)
            await redis.delete(f"arq:job:gen:{task_id}:0")
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "UPDATE tasks SET status = 'processing', attempt = 1, "
                        "lease_expires_at = NULL WHERE id = :id"
                    ),
                    {"id": task_id},
                )
        finally:
            await redis.aclose()
            await engine.dispose()
        worker, running = start_worker(settings)
        try:
            done = await wait_for_status(c, key, task_id, {"completed", "failed"})
        finally:
            await stop_worker(worker, running)
        assert done["status"] == "completed", done


async def test_a_silent_workers_task_resumes_its_upstream_job(
    fast_settings: Settings, simulator: Sim, tenant_key: tuple[str, str]
) -> None:
    """A worker that died after submitting: the next attempt polls the same upstream job."""
    from gateway.app import create_app

    settings = fast_settings
    await simulator.configure(latency=1.0)
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        _, key = tenant_key
        task_id = await create_task(c, key, {"model": "krea-2-medium", "prompt": "orphan"})
        built = Deps(settings)
        try:
            # Play the dying worker: claim, submit upstream, record the job id, vanish.
            async with built.engine.begin() as conn:
                claimed = await lifecycle.claim(conn, task_id, 0, settings.lease_seconds)
            assert claimed is not None
            route = await built.value.directory.get("env:krea")
            assert route is not None
            request = ImageRequest.from_json(claimed.request)
            submitted = await route.provider.submit("krea/krea-2/medium", request)
            assert submitted.job_id is not None
            async with built.engine.begin() as conn:
                assert await lifecycle.record_route(
                    conn,
                    task_id,
                    0,
                    settings.lease_seconds,
                    channel_id=route.id,
                    upstream_job_id=submitted.job_id,
                    can_cancel=True,
                )
        finally:
            await built.close()
        redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
        try:
            await redis.delete(settings.queue_name)  # its job died with it
        finally:
            await redis.aclose()
        worker, running = start_worker(settings)
        try:
            done = await wait_for_status(c, key, task_id, {"completed", "failed"})
        finally:
            await stop_worker(worker, running)
        assert done["status"] == "completed", done
        assert (await simulator.stats())["submits"] == 1


async def test_a_channels_next_job_is_polled_around_the_end_its_last_one_took(
    settings: Settings, client: Client, tenant_key: tuple[str, str], simulator: Sim, deps: Any
) -> None:
    """workers/job_clock.py: the first job is polled every interval and teaches the
    worker how long the model's jobs take there; the next one's polls come near its end."""
    _, key = tenant_key
    latency = 1.5
    await simulator.configure(latency=latency)
    polls = []
    for prompt in ("first", "second"):
        before = (await simulator.stats())["polls"]
        task_id = await create_task(client, key, {"model": "krea-2-medium", "prompt": prompt})
        outcome = await generate_task({"deps": deps}, task_id, 0)
        assert outcome.startswith("completed"), outcome
        polls.append((await simulator.stats())["polls"] - before)
    expected = deps.job_clock.expected("env:krea", "krea-2-medium")
    assert expected is not None
    # Counted from the submit's answer: a submit slow to answer (a loaded machine) makes
    # the job look shorter than the simulator's latency; a late poll, a little longer.
    assert 0 < expected <= latency + 1.0, expected
    # Every 0.1 s for 1.5 s, against a wait and a few steps of 0.025 s near the end.
    assert polls[1] < polls[0], polls


async def test_a_run_records_only_the_progress_it_reports(
    settings: Settings, tenant_key: tuple[str, str]
) -> None:
    """A route or lease renewal without progress leaves it as it was (PostgreSQL's
    ``least`` skips NULLs: an unguarded one would jump every such task to 99)."""
    from gateway.app import create_app

    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        _, key = tenant_key
        task_id = await create_task(c, key, {"model": "krea-2-medium", "prompt": "progress"})
    engine = create_engine(settings)
    lease = settings.lease_seconds

    async def progress() -> int:
        async with engine.connect() as conn:
            found = await conn.execute(
                text("SELECT progress FROM tasks WHERE id = :id"), {"id": task_id}
            )
            value: int = found.scalar_one()
            return value

    try:
        async with engine.begin() as conn:
            assert await lifecycle.claim(conn, task_id, 0, lease) is not None
        assert await progress() == 5
        route = {"channel_id": "env:krea", "can_cancel": True}
        async with engine.begin() as conn:
            assert await lifecycle.record_route(
                conn, task_id, 0, lease, upstream_job_id=None, **route
            )
            assert await lifecycle.heartbeat(conn, task_id, 0, lease)
        assert await progress() == 5
        async with engine.begin() as conn:
            assert await lifecycle.record_route(
                conn, task_id, 0, lease, upstream_job_id="job-1", progress=10, **route
            )
            assert await lifecycle.heartbeat(conn, task_id, 0, lease, progress=50)
            assert await lifecycle.heartbeat(conn, task_id, 0, lease, progress=30)
        assert await progress() == 50  # never backwards
        async with engine.begin() as conn:
            assert await lifecycle.heartbeat(conn, task_id, 0, lease, progress=100)
        assert await progress() == 99  # 100 is the completion's alone
    finally:
        await engine.dispose()


async def test_a_claim_records_the_channel_unless_an_upstream_job_runs_elsewhere(
    settings: Settings, tenant_key: tuple[str, str]
) -> None:
    """The claim records the channel the run holds a slot on (the first submit's route
    record, in the same statement); a task whose upstream job runs keeps that job's channel,
    and the claim returns it."""
    from gateway.app import create_app

    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        _, key = tenant_key
        task_id = await create_task(c, key, {"model": "krea-2-medium", "prompt": "claim"})
    engine = create_engine(settings)
    lease = settings.lease_seconds

    async def route() -> tuple[str | None, bool]:
        async with engine.connect() as conn:
            found = await conn.execute(
                text("SELECT channel_id, can_cancel FROM tasks WHERE id = :id"), {"id": task_id}
            )
            channel, can_cancel = found.one()
            return channel, can_cancel

    try:
        async with engine.begin() as conn:
            claimed = await lifecycle.claim(
                conn, task_id, 0, lease, channel_id="env:krea", can_cancel=True
            )
        assert claimed is not None
        assert (claimed.channel_id, claimed.upstream_job_id) == ("env:krea", None)
        assert await route() == ("env:krea", True)
        async with engine.begin() as conn:
            assert await lifecycle.record_route(
                conn, task_id, 0, lease, channel_id="env:krea", upstream_job_id="job-1",
                can_cancel=True,
            )  # fmt: skip
            await conn.execute(
                text(
                    "UPDATE tasks SET lease_expires_at = now() - interval '1 second', "
                    "attempt = 1 WHERE id = :id"
                ),
                {"id": task_id},
            )
            claimed = await lifecycle.claim(
                conn, task_id, 1, lease, channel_id="env:other", can_cancel=False
            )
        assert claimed is not None
        assert (claimed.channel_id, claimed.upstream_job_id) == ("env:krea", "job-1")
        assert await route() == ("env:krea", True)
    finally:
        await engine.dispose()


async def test_a_task_past_its_deadline_fails_with_timeout(
    database_url: str,
    simulator_url: str,
    tmp_path: Path,
    simulator: Sim,
    tenant_key: tuple[str, str],
) -> None:
    from gateway.app import create_app

    settings = make_settings(database_url, simulator_url, tmp_path / "s", task_deadline_seconds=5)
    await simulator.configure(latency=60)
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        _, key = tenant_key
        task_id = await create_task(c, key, {"model": "krea-2-medium", "prompt": "slow"})
        worker, running = start_worker(settings)
        try:
            done = await wait_for_status(c, key, task_id, {"completed", "failed"}, wait=20)
        finally:
            await stop_worker(worker, running)
        assert done["status"] == "failed"
        assert done["error"]["code"] == "timeout"


def slow_down_recovery(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[float]:
    """The worker's queue recovery, ``seconds`` slower; returns when each one finished."""
    import workers.main

    finished: list[float] = []
    recover = workers.main.recover_lost_queue

    async def slow_recovery(*args: Any) -> int | None:
        await asyncio.sleep(seconds)
        found = await recover(*args)
        finished.append(time.time())
        return found

    monkeypatch.setattr(workers.main, "recover_lost_queue", slow_recovery)
    return finished


async def test_a_worker_started_behind_a_backlog_recovers_the_queue_before_its_first_job(
    settings: Settings,
    client: Client,
    tenant_key: tuple[str, str],
    simulator: Sim,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No worker has marked the queue yet (a first start behind the gateways): the worker
    queues it again before its first job, so that none of its own runs ends meanwhile and
    is queued again (a job that would only find its task over). The recovery is slowed
    here so that a worker running jobs beside it would show."""
    recovered_at = slow_down_recovery(monkeypatch, 0.5)
    _, key = tenant_key
    body = {"model": "flux-1-schnell", "prompt": "backlog", "size": "512x512"}
    task_ids = [await create_task(client, key, body) for _ in range(40)]
    caplog.set_level("INFO", logger="tollgate.generate")
    worker, running = start_worker(settings)
    try:
        for task_id in task_ids:
            done = await wait_for_status(client, key, task_id, {"completed", "failed"}, wait=60)
            assert done["status"] == "completed", done
    finally:
        await stop_worker(worker, running)
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            first_start = (
                await conn.execute(
                    text(
                        "SELECT extract(epoch FROM min(started_at)) FROM tasks WHERE id = ANY(:ids)"
                    ),
                    {"ids": task_ids},
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    assert recovered_at
    assert float(first_start) > recovered_at[0]
    outcomes = [r.getMessage() for r in caplog.records if r.name == "tollgate.generate"]
    assert sum("completed" in line for line in outcomes) == len(task_ids)
    assert not [line for line in outcomes if "skipped" in line]


async def test_a_recovery_longer_than_its_head_start_goes_on_beside_the_jobs(
    settings: Settings,
    client: Client,
    tenant_key: tuple[str, str],
    simulator: Sim,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backlog too large to queue again within the head start does not idle the worker:
    past it, the jobs run beside the recovery."""
    import workers.main

    finished = slow_down_recovery(monkeypatch, 3)
    monkeypatch.setattr(workers.main, "RECOVERY_HEAD_START_SECONDS", 0.2)
    _, key = tenant_key
    body = {"model": "flux-1-schnell", "prompt": "head start", "size": "512x512"}
    task_id = await create_task(client, key, body)
    worker, running = start_worker(settings)
    try:
        done = await wait_for_status(client, key, task_id, {"completed", "failed"}, wait=20)
        assert done["status"] == "completed", done
        assert not finished  # completed while the recovery still ran
    finally:
        await stop_worker(worker, running)
