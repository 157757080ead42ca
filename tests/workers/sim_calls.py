"""Calls to an in-process simulator (fixtures ``sim_client``, ``sim_http``), for its tests."""

from typing import Any

import httpx
from conftest import INPROCESS_SIM_KEY

API_KEY = INPROCESS_SIM_KEY
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MEDIUM = "/generate/image/krea/krea-2/medium"
GENERATIONS = "/v1/images/generations"
SCHNELL = "black-forest-labs/FLUX.1-schnell"


async def configure(client: httpx.AsyncClient, **changes: Any) -> dict[str, Any]:
    response = await client.post("/_sim/config", json=changes)
    assert response.status_code == 200, response.text
    knobs: dict[str, Any] = response.json()
    return knobs


async def submit(client: httpx.AsyncClient, path: str = MEDIUM, **body: Any) -> httpx.Response:
    return await client.post(path, json={"prompt": "a lighthouse at dusk", **body}, headers=AUTH)


async def submit_job(client: httpx.AsyncClient, path: str = MEDIUM, **body: Any) -> str:
    response = await submit(client, path, **body)
    assert response.status_code == 200, response.text
    job_id: str = response.json()["job_id"]
    return job_id


async def poll(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def generate(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    """One SiliconFlow-style call; `body` overrides (or, as None, drops) the minimal fields."""
    minimal = {"model": SCHNELL, "prompt": "a lighthouse at dusk", "image_size": "1024x1024"}
    fields = {k: v for k, v in {**minimal, **body}.items() if v is not None}
    return await client.post(GENERATIONS, json=fields, headers=AUTH)


def assert_siliconflow_error(response: httpx.Response, status: int, code: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "data"}
    assert (body["code"], body["data"]) == (code, None)
    message: str = body["message"]
    return message
