"""Retention on both backends: a task's files go once its links have expired and the grace
period has passed; the metric counts files and bytes; the links answer 410; tasks not yet
due, and other tasks' files, stay; the fleet runs it once per interval."""

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from conftest import (
    REDIS_URL,
    Sim,
    bearer,
    make_settings,
    make_tenant_key,
    scalar,
    start_worker,
    stop_worker,
    wait_for_status,
    worker_deps,
)
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from s3_server import S3Server, s3_server, s3_settings
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.db import create_engine
from gateway.redis_keys import retention_key
from gateway.settings import Settings
from gateway.storage import build_storage
from workers.deps import WorkerDeps
from workers.main import create_worker
from workers.retention import delete_expired_results, retention

Client = AsyncTestClient[Any]
GRACE = 3600


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(params=["file", "s3"])
def backend_settings(
    request: pytest.FixtureRequest, database_url: str, simulator_url: str, tmp_path: Path
) -> Settings:
    # The workers these tests start run no retention of their own (the cron is off): only
    # the calls the tests make delete anything.
    extra: dict[str, Any] = {"result_grace_seconds": GRACE, "retention_interval_seconds": 0}
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3")
        extra.update(s3_settings(server, server.create_bucket(), "kept"))
    return make_settings(database_url, simulator_url, tmp_path / "storage", **extra)


@pytest.fixture
async def deps(backend_settings: Settings) -> AsyncIterator[WorkerDeps]:
    engine = create_engine(backend_settings)
    http = httpx.AsyncClient(trust_env=False)
    yield worker_deps(backend_settings, engine, http, storage=build_storage(backend_settings))
    await http.aclose()
    await engine.dispose()


async def finished_tasks(settings: Settings, key: str, count: int) -> list[dict[str, Any]]:
    """``count`` tasks run to their end by a real worker through the real app."""
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        ids = []
        for _ in range(count):
            response = await c.post(
                "/v1/images/generations",
                json={"model": "flux-1-schnell", "prompt": "a lighthouse", "size": "512x512"},
                headers=bearer(key),
            )
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        arq_worker, running = start_worker(settings)
        try:
            return [
                await wait_for_status(c, key, task_id, {"completed", "failed"}) for task_id in ids
            ]
        finally:
            await stop_worker(arq_worker, running)


async def age(engine: AsyncEngine, task_id: str, seconds: int) -> None:
    """Pretend the task ended, and its links expired, ``seconds`` ago."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE tasks SET finished_at = now() - make_interval(secs => :s), "
                "results_expire_at = CASE WHEN results_expire_at IS NULL THEN NULL "
                "ELSE now() - make_interval(secs => :s) END WHERE id = :id"
            ),
            {"s": seconds, "id": task_id},
        )


def counted(backend: str) -> tuple[float, float]:
    files = REGISTRY.get_sample_value("tollgate_results_deleted_files_total", {"backend": backend})
    size = REGISTRY.get_sample_value("tollgate_results_deleted_bytes_total", {"backend": backend})
    return files or 0.0, size or 0.0


@pytest.mark.usefixtures("simulator")
async def test_files_go_after_expiry_and_grace_and_their_links_answer_410(
    deps: WorkerDeps, simulator: Sim
) -> None:
    settings = deps.settings
    storage = deps.storage
    _, key = await make_tenant_key(settings)
    due, recent, fresh = await finished_tasks(settings, key, 3)
    for task in (due, recent, fresh):
        assert task["status"] == "completed", task
    sizes = {}
    for task in (due, recent, fresh):
        data = await storage.get(f"{task['id']}/0.png")
        assert data is not None
        sizes[task["id"]] = len(data)
    # A failed task may have left files of its own (a run that stored, then lost the task).
    await simulator.configure(failure_rate=1.0, error_kind="job_failed")
    (failed,) = await finished_tasks(settings, key, 1)
    await simulator.configure(failure_rate=0.0, error_kind="none")
    assert failed["status"] == "failed", failed
    await storage.put(f"{failed['id']}/0.png", b"\x89PNG\r\n\x1a\n" + b"o" * 1000)
    await age(deps.engine, due["id"], GRACE + 60)  # expired, and the grace is over
    await age(deps.engine, recent["id"], GRACE - 60)  # expired, still within the grace
    await age(deps.engine, failed["id"], GRACE + 1)

    before = counted(storage.backend)
    deleted = await delete_expired_results(deps)
    assert (deleted.files, deleted.bytes) == (2, sizes[due["id"]] + 1008)
    after = counted(storage.backend)
    assert (after[0] - before[0], after[1] - before[1]) == (2, sizes[due["id"]] + 1008)

    assert await storage.get(f"{due['id']}/0.png") is None
    assert await storage.get(f"{failed['id']}/0.png") is None
    assert await storage.get(f"{recent['id']}/0.png") is not None
    assert await storage.get(f"{fresh['id']}/0.png") is not None
    marked = "SELECT results_deleted_at IS NOT NULL FROM tasks WHERE id = :id"
    assert await scalar(deps.engine, marked, id=due["id"]) is True
    assert await scalar(deps.engine, marked, id=recent["id"]) is False

    # Its links: expired, so 410 (the row and its results stay).
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        task = (await c.get(f"/v1/tasks/{due['id']}", headers=bearer(key))).json()
        assert task["status"] == "completed"
        link = urlsplit(task["results"][0])
        gone = await c.get(f"{link.path}?{link.query}")
        assert gone.status_code == 410
        assert gone.json()["error"]["code"] == "link_expired"
        # The link handed out before, still within its own expiry, finds no file: 404, not 500.
        old = urlsplit(due["results"][0])
        assert (await c.get(f"{old.path}?{old.query}")).status_code == 404

    again = await delete_expired_results(deps)
    assert (again.files, again.bytes) == (0, 0)


async def test_the_fleet_runs_retention_once_per_interval(deps: WorkerDeps) -> None:
    settings = deps.settings.model_copy(
        update={"queue_name": f"tollgate:test:{uuid.uuid4().hex}", "retention_interval_seconds": 60}
    )
    redis: ArqRedis = await create_pool(RedisSettings.from_dsn(REDIS_URL))
    ctx: dict[str, Any] = {
        "deps": WorkerDeps(**{**deps.__dict__, "settings": settings}),
        "redis": redis,
    }
    try:
        first = await retention(ctx)
        assert first.startswith("deleted")
        assert await retention(ctx) == "skipped: ran within the interval"
        assert 0 < await redis.ttl(retention_key(settings.queue_name)) <= 60
    finally:
        await redis.delete(retention_key(settings.queue_name))
        await redis.aclose()


async def test_the_worker_schedules_retention_unless_it_is_off(settings: Settings) -> None:
    # Async, so arq's Worker takes the running loop: built with no loop running, it makes
    # an event loop of its own that nothing closes (the suite's one unclosed loop).
    names = [job.name for job in create_worker(settings).cron_jobs]
    assert "retention" in names
    off = settings.model_copy(update={"retention_interval_seconds": 0})
    assert "retention" not in [job.name for job in create_worker(off).cron_jobs]
