"""The result store going away in the middle of a job: the storing step waits and tries
again, keeping the task (never completed without its images); when the store is back
the task completes with every image stored; when it stays away past the task's
deadline the task fails with ``storage_unavailable`` and its hold is released.

The store is moto's S3 server, stopped and started again on the same port."""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import (
    Sim,
    bearer,
    make_settings,
    make_tenant_key,
    rows_of,
    start_worker,
    stop_worker,
    wait_for_status,
)
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from s3_server import S3Server, s3_server, s3_settings
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.settings import Settings
from workers.simulator.png import png_size

Client = AsyncTestClient[Any]


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    # Its own server: these tests stop it.
    with s3_server(tmp_path) as server:
        yield server


def outage_settings(
    database_url: str, simulator_url: str, tmp_path: Path, s3: S3Server, **extra: Any
) -> tuple[Settings, str]:
    bucket = s3.create_bucket()
    settings = make_settings(
        database_url,
        simulator_url,
        tmp_path / "unused",
        **{**s3_settings(s3, bucket), "storage_timeout_seconds": 1.0, **extra},
    )
    return settings, bucket


def put_failures() -> float:
    value = REGISTRY.get_sample_value(
        "tollgate_storage_errors_total", {"backend": "s3", "operation": "put"}
    )
    return value or 0.0


async def wait_until(predicate: Any, wait: float) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached")


@pytest.mark.usefixtures("simulator")
async def test_a_store_that_goes_away_mid_job_delays_the_task_until_it_is_back(
    database_url: str,
    simulator_url: str,
    tmp_path: Path,
    s3: S3Server,
    simulator: Sim,
) -> None:
    settings, bucket = outage_settings(
        database_url, simulator_url, tmp_path, s3, task_deadline_seconds=60
    )
    # Two images generated upstream in 1.5 s; the store goes away while they are made.
    await simulator.configure(latency=1.5)
    _, key = await make_tenant_key(settings)
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        submitted = await c.post(
            "/v1/images/generations",
            json={"model": "flux-1-schnell", "prompt": "a harbour", "size": "512x512", "n": 2},
            headers=bearer(key),
        )
        assert submitted.status_code == 200, submitted.text
        task_id = submitted.json()["id"]
        failures = put_failures()
        arq_worker, running = start_worker(settings)
        try:
            await wait_for_status(c, key, task_id, {"processing"})
            s3.stop()
            await wait_until(lambda: put_failures() >= failures + 2, wait=20)
            waiting = (await c.get(f"/v1/tasks/{task_id}", headers=bearer(key))).json()
            assert waiting["status"] == "processing", waiting
            assert "results" not in waiting
            s3.start()  # back, empty: the bucket is made again
            s3.create_bucket(bucket)
            done = await wait_for_status(c, key, task_id, {"completed", "failed"}, wait=40)
        finally:
            await stop_worker(arq_worker, running)
        assert done["status"] == "completed", done
        assert len(done["results"]) == 2
        assert s3.keys(bucket) == [f"{task_id}/0.png", f"{task_id}/1.png"]
        for url in done["results"]:
            link = urlsplit(url)
            image = await c.get(f"{link.path}?{link.query}")
            assert image.status_code == 200
            assert png_size(image.content) == (512, 512)
    assert done["usage"]["credits_charged"] == done["usage"]["credits_reserved"]


@pytest.mark.usefixtures("simulator")
async def test_a_store_away_past_the_deadline_fails_the_task_and_releases_its_hold(
    database_url: str, simulator_url: str, tmp_path: Path, s3: S3Server, engine: AsyncEngine
) -> None:
    settings, _ = outage_settings(
        database_url, simulator_url, tmp_path, s3, task_deadline_seconds=6
    )
    tenant_id, key = await make_tenant_key(settings)
    s3.stop()
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        submitted = await c.post(
            "/v1/images/generations",
            json={"model": "flux-1-schnell", "prompt": "a harbour", "size": "512x512"},
            headers=bearer(key),
        )
        assert submitted.status_code == 200, submitted.text
        arq_worker, running = start_worker(settings)
        try:
            done = await wait_for_status(
                c, key, submitted.json()["id"], {"completed", "failed"}, wait=30
            )
        finally:
            await stop_worker(arq_worker, running)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "storage_unavailable"
    assert "results" not in done
    assert "credits_charged" not in done["usage"] or done["usage"]["credits_charged"] == 0
    rows = await rows_of(engine, tenant_id)
    assert rows.get("hold") == 1
    assert rows.get("release") == 1
    assert "capture" not in rows
