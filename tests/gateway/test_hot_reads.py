"""The polled reads answered in front of litestar (gateway/hot_reads.py) answer as the
routes do: the same status, body and headers, the same errors and limits.

A query string sends a read through litestar's route instead, so each answer here is
compared with the route's answer to the same request.
"""

from typing import Any

from conftest import assert_error, bearer, make_tenant_key, wait_for_status
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import Settings

Client = AsyncTestClient[Any]

# Headers whose values differ between two requests (each its own id and allowance).
_VARYING = {"x-request-id", "ratelimit", "date"}


def served(client: Client) -> int:
    return int(client.app.state.hot_reads.served)


async def both_ways(client: Client, path: str, key: str) -> tuple[Any, Any]:
    """The answer in front of litestar, then the route's (counted apart)."""
    before = served(client)
    hot = await client.get(path, headers=bearer(key))
    assert served(client) == before + 1, "the hot read was not answered in front of litestar"
    routed = await client.get(f"{path}?through=litestar", headers=bearer(key))
    assert served(client) == before + 1, "a read with a query string must go to litestar"
    return hot, routed


def assert_alike(hot: Any, routed: Any) -> None:
    assert hot.status_code == routed.status_code
    assert hot.content == routed.content
    assert set(hot.headers) == set(routed.headers)
    for name in set(hot.headers) - _VARYING:
        assert hot.headers[name] == routed.headers[name], name


async def submit(client: Client, key: str) -> str:
    response = await client.post(
        "/v1/images/generations",
        json={"model": "krea-2-turbo", "prompt": "a lighthouse", "size": "16:9"},
        headers=bearer(key),
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def test_a_pending_task_unknown_task_and_model_list_answer_as_the_routes_do(
    client: Client, tenant_key: tuple[str, str], settings: Settings
) -> None:
    _, key = tenant_key
    task_id = await submit(client, key)
    hot, routed = await both_ways(client, f"/v1/tasks/{task_id}", key)
    assert_alike(hot, routed)
    assert hot.json()["status"] == "pending"
    assert "X-Request-ID" in hot.headers

    hot, routed = await both_ways(client, "/v1/tasks/task-unified-nope", key)
    assert_alike(hot, routed)
    assert_error(hot, 404, "not_found")

    # Another tenant's task is not found, as through the route.
    _, other = await make_tenant_key(settings)
    hot, routed = await both_ways(client, f"/v1/tasks/{task_id}", other)
    assert_alike(hot, routed)
    assert_error(hot, 404, "not_found")

    hot, routed = await both_ways(client, "/v1/models", key)
    assert_alike(hot, routed)
    assert {m["id"] for m in hot.json()["data"]} >= {"krea-2-turbo"}


async def test_a_completed_task_answers_as_the_route_does(
    client: Client, tenant_key: tuple[str, str], worker: None
) -> None:
    _, key = tenant_key
    task_id = await submit(client, key)
    await wait_for_status(client, key, task_id, {"completed"})
    hot, routed = await both_ways(client, f"/v1/tasks/{task_id}", key)
    assert_alike(hot, routed)
    assert hot.json()["status"] == "completed"


async def test_what_the_hot_reads_leave_to_litestar(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    task_id = await submit(client, key)
    before = served(client)
    # No key, a wrong key: litestar answers the 401 (nothing was counted before it).
    assert_error(await client.get(f"/v1/tasks/{task_id}"), 401, "unauthorized")
    assert_error(await client.get("/v1/models", headers=bearer("tg_nope")), 401, "unauthorized")
    # A long-poll, the list of tasks, a task's events, another method.
    waited = await client.get(f"/v1/tasks/{task_id}", headers={**bearer(key), "Prefer": "wait=0"})
    assert waited.status_code == 200
    assert waited.headers["Preference-Applied"] == "wait=0"
    assert (await client.get("/v1/tasks", headers=bearer(key))).status_code == 200
    assert (await client.get("/v1/tasks/", headers=bearer(key))).status_code in (200, 404)
    assert_error(await client.delete("/v1/models", headers=bearer(key)), 405, "method_not_allowed")
    assert served(client) == before


async def test_the_hot_reads_count_against_the_rate_limits(
    settings: Settings, tenant_key: tuple[str, str]
) -> None:
    strict = settings.model_copy(
        update={"default_key_rate_limit_per_minute": 1, "default_key_rate_limit_burst": 1}
    )
    _, key = tenant_key
    async with AsyncTestClient(app=create_app(strict), base_url="http://testserver.local") as c:
        first = await c.get("/v1/models", headers=bearer(key))
        assert first.status_code == 200
        refused = await c.get("/v1/models", headers=bearer(key))
        assert_error(refused, 429, "rate_limit_exceeded")
        assert int(refused.headers["Retry-After"]) >= 1
        assert "RateLimit-Policy" in refused.headers
        assert served(c) == 2
        # The route refuses the same way.
        routed = await c.get("/v1/models?through=litestar", headers=bearer(key))
        assert_alike(refused, routed)
