"""The unified adapter in front of a real Tollgate: Tollgate's own task object, read back."""

import asyncio
from typing import Any

import pytest
from conftest import Sim, bearer
from litestar.testing import AsyncTestClient
from provider_calls import request_for

from workers.providers import ADAPTERS
from workers.providers.base import Endpoint, UpstreamRejected
from workers.simulator.png import png_size


async def test_unified_adapter_sits_in_front_of_another_tollgate(
    client: AsyncTestClient[Any], tenant_key: tuple[str, str], worker: None, simulator: Sim
) -> None:
    """Tollgate's own task object, results and cancel answer, read by the unified adapter."""
    _, key = tenant_key
    adapter = ADAPTERS["unified"](client, Endpoint(base_url=str(client.base_url), api_key=key))
    request = request_for("krea-2-medium", size="16:9", seed=12)
    submitted = await adapter.submit("krea-2-medium", request)
    assert submitted.job_id is not None
    assert submitted.job_id.startswith("task-unified-")
    state = await adapter.poll(submitted.job_id)
    for _ in range(200):
        if state.status in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(0.05)
        state = await adapter.poll(submitted.job_id)
    assert state.status == "completed", state
    [url] = state.urls
    image = await client.get(url)
    assert png_size(image.content) == (1344, 768)
    # The downstream task is final: its cancel answers a refusal (409), in our words.
    with pytest.raises(UpstreamRejected, match="cannot cancel"):
        await adapter.cancel(submitted.job_id)
    task = (await client.get(f"/v1/tasks/{submitted.job_id}", headers=bearer(key))).json()
    assert task["status"] == "completed"
