"""``POST /v1/tasks/{id}/cancel``: pending tasks, running tasks whose upstream can stop them,
and the ones that cannot be cancelled. Real gateway, worker, simulator, PostgreSQL, Redis."""

import asyncio
import time
from typing import Any

import httpx
from conftest import SIM_KEY, Sim, bearer, rows_of, scalar, start_worker, stop_worker
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.settings import Settings

Client = AsyncTestClient[Any]


async def submit(client: Client, key: str, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": "a slow lighthouse", **extra}
    response = await client.post("/v1/images/generations", json=body, headers=bearer(key))
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


async def held(engine: AsyncEngine, tenant_id: str) -> int:
    value: int = await scalar(
        engine, "SELECT held_micros FROM tenants WHERE id = :id", id=tenant_id
    )
    return value


async def wait_until(client: Client, key: str, task_id: str, check: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        task: dict[str, Any] = (
            await client.get(f"/v1/tasks/{task_id}", headers=bearer(key))
        ).json()
        if check(task):
            return task
        assert time.monotonic() < deadline, task
        await asyncio.sleep(0.05)


async def test_a_pending_task_is_cancelled_and_its_hold_released(
    client: Client, engine: AsyncEngine, tenant_key: tuple[str, str]
) -> None:
    tenant_id, key = tenant_key
    task = await submit(client, key, "krea-2-medium")  # no worker runs: it stays pending
    assert task["task_info"]["can_cancel"] is True
    assert await held(engine, tenant_id) == 45_000  # krea-2-medium's sale price

    response = await client.post(f"/v1/tasks/{task['id']}/cancel", headers=bearer(key))
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["task_info"]["can_cancel"] is False
    assert cancelled["usage"]["credits_charged"] == 0
    assert await held(engine, tenant_id) == 0
    assert await rows_of(engine, tenant_id) == {"topup": 1, "hold": 1, "release": 1, "tasks": 1}

    again = await client.post(f"/v1/tasks/{task['id']}/cancel", headers=bearer(key))
    assert again.status_code == 409
    assert "cancelled" in again.json()["error"]["message"]


async def test_another_tenants_task_cannot_be_cancelled(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    from conftest import make_tenant_key

    _, key = tenant_key
    _, other_key = await make_tenant_key(settings)
    task = await submit(client, key, "krea-2-medium")
    response = await client.post(f"/v1/tasks/{task['id']}/cancel", headers=bearer(other_key))
    assert response.status_code == 404
    missing = await client.post("/v1/tasks/task_nope/cancel", headers=bearer(key))
    assert missing.status_code == 404


async def test_a_running_krea_job_is_cancelled_here_and_at_the_upstream(
    client: Client,
    settings: Settings,
    engine: AsyncEngine,
    simulator: Sim,
    tenant_key: tuple[str, str],
) -> None:
    tenant_id, key = tenant_key
    await simulator.configure(latency=30)
    worker, running = start_worker(settings)
    try:
        task = await submit(client, key, "krea-2-medium")
        await wait_until(
            client,
            key,
            task["id"],
            # Progress 10: the upstream job id is recorded.
            lambda t: (
                t["status"] == "processing" and t["task_info"]["can_cancel"] and t["progress"] >= 10
            ),
        )
        response = await client.post(f"/v1/tasks/{task['id']}/cancel", headers=bearer(key))
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        job_id = await scalar(
            engine, "SELECT upstream_job_id FROM tasks WHERE id = :id", id=task["id"]
        )
        # The worker's cancel job reaches the upstream.
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 10
            while True:
                job = (
                    await http.get(
                        f"{simulator.url}/jobs/{job_id}",
                        headers={"Authorization": f"Bearer {SIM_KEY}"},
                    )
                ).json()
                if job["status"] == "cancelled":
                    break
                assert time.monotonic() < deadline, job
                await asyncio.sleep(0.1)
    finally:
        await stop_worker(worker, running)
    final = (await client.get(f"/v1/tasks/{task['id']}", headers=bearer(key))).json()
    assert final["status"] == "cancelled"  # the stopped worker wrote nothing over it
    assert await held(engine, tenant_id) == 0
    assert await rows_of(engine, tenant_id) == {"topup": 1, "hold": 1, "release": 1, "tasks": 1}


async def test_a_running_synchronous_generation_cannot_be_cancelled(
    client: Client, settings: Settings, simulator: Sim, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    await simulator.configure(latency=3)
    worker, running = start_worker(settings)
    try:
        task = await submit(client, key, "flux-1-schnell")
        seen = await wait_until(client, key, task["id"], lambda t: t["status"] != "pending")
        if seen["status"] == "processing":
            assert seen["task_info"]["can_cancel"] is False
            response = await client.post(f"/v1/tasks/{task['id']}/cancel", headers=bearer(key))
            assert response.status_code == 409
            assert "cannot stop it" in response.json()["error"]["message"]
        done = await wait_until(client, key, task["id"], lambda t: t["status"] == "completed")
        assert done["task_info"]["can_cancel"] is False
    finally:
        await stop_worker(worker, running)


async def test_the_krea_door_cancels_with_delete_jobs(
    client: Client, engine: AsyncEngine, tenant_key: tuple[str, str]
) -> None:
    tenant_id, key = tenant_key
    created = await client.post(
        "/generate/image/krea/krea-2/large", json={"prompt": "never mind"}, headers=bearer(key)
    )
    assert created.status_code == 200, created.text
    job_id = created.json()["job_id"]
    response = await client.delete(f"/jobs/{job_id}", headers=bearer(key))
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["job_id"] == job_id
    assert job["status"] == "cancelled"
    assert await held(engine, tenant_id) == 0
    again = await client.delete(f"/jobs/{job_id}", headers=bearer(key))
    assert again.status_code == 409
    assert "cancelled" in again.json()["error"]
