"""The unified endpoint over HTTP: the task object, errors, isolation, models."""

import asyncio
import uuid
from typing import Any

import pytest
from conftest import assert_error, bearer, make_tenant_key
from litestar.testing import AsyncTestClient

from gateway.db import close_hot_pool, create_hot_pool
from gateway.errors import NotFound
from gateway.settings import Settings
from gateway.tasks.reads import TaskReads

TASK_FIELDS = {
    "created",
    "id",
    "model",
    "object",
    "progress",
    "status",
    "task_info",
    "type",
    "usage",
}

Client = AsyncTestClient[Any]


async def submit(client: Client, key: str, body: dict[str, Any], **headers: str) -> Any:
    return await client.post(
        "/v1/images/generations", json=body, headers={**bearer(key), **headers}
    )


async def test_submit_returns_the_contract_task_object(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    response = await submit(
        client, key, {"model": "krea-2-turbo", "prompt": "a lighthouse", "size": "16:9"}
    )
    assert response.status_code == 200, response.text
    task = response.json()
    assert set(task) == TASK_FIELDS
    assert task["id"].startswith("task-unified-")
    assert task["object"] == "image.generation.task"
    assert task["type"] == "image"
    assert task["status"] == "pending"
    assert task["progress"] == 0
    assert task["model"] == "krea-2-turbo"
    # Pending: it can be cancelled until a worker takes it.
    assert task["task_info"] == {"can_cancel": True, "estimated_time": 4}
    assert set(task["usage"]) == {"billing_rule", "credits_reserved", "user_group"}
    assert task["usage"]["billing_rule"] == "per_call"
    assert task["usage"]["user_group"] == "default"


async def test_credits_reserved_is_the_seed_worked_example(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    body = {
        "model": "stable-diffusion-3-5-large-turbo",
        "prompt": "a cat",
        "size": "1024x512",
        "num_inference_steps": 4,
    }
    response = await submit(client, key, body)
    assert response.status_code == 200, response.text
    # The shipped sale price: 0.5 MP × 4 steps × 0.000672 (¥0.0032 × 0.14 × 1.5).
    assert '"credits_reserved":0.001344' in response.text
    # A group sold at the seed's own figures pays the seed's examples, exactly.
    admin = bearer(settings.admin_token)
    group = f"seed-{uuid.uuid4().hex[:8]}"
    assert (await client.post("/admin/groups", json={"name": group}, headers=admin)).is_success
    for model, amount in (("stable-diffusion-3-5-large-turbo", "0.0032"), ("flux-1-pro", "0.37")):
        path = f"/admin/groups/{group}/prices/{model}"
        assert (await client.put(path, json={"amount": amount}, headers=admin)).is_success
    _, seed_key = await make_tenant_key(settings, group=group)
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.1)
    response = await submit(client, seed_key, body)
    assert response.status_code == 200, response.text
    # Rendered from exact decimals: the JSON text itself says 0.0064.
    assert '"credits_reserved":0.0064' in response.text
    flux = await submit(client, seed_key, {"model": "flux-1-pro", "prompt": "a cat", "n": 2})
    assert '"credits_reserved":0.74' in flux.text


async def test_get_task_returns_the_same_object(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    created = (await submit(client, key, {"model": "krea-1", "prompt": "x"})).json()
    fetched = await client.get(f"/v1/tasks/{created['id']}", headers=bearer(key))
    assert fetched.status_code == 200
    assert fetched.json() == created


async def test_another_tenants_task_is_not_found(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    _, key_a = tenant_key
    _, key_b = await make_tenant_key(settings)
    created = (await submit(client, key_a, {"model": "krea-1", "prompt": "x"})).json()
    response = await client.get(f"/v1/tasks/{created['id']}", headers=bearer(key_b))
    assert_error(response, 404, "not_found")
    missing = await client.get("/v1/tasks/task-unified-0-nosuchtask", headers=bearer(key_b))
    # Same answer as for an id that does not exist: nothing to tell the two apart.
    assert missing.json()["error"]["code"] == response.json()["error"]["code"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "krea-1"}, "prompt"),
        ({"model": "krea-1", "prompt": ""}, "prompt"),
        ({"model": "krea-1", "prompt": "x", "seed": "seven"}, "seed"),
        ({"model": "krea-1", "prompt": "x", "seed": -1}, "seed"),
        ({"model": "krea-1", "prompt": "x", "colour": "red"}, "colour"),
        ({"model": "krea-2-turbo", "prompt": "x", "n": 2}, "n"),
        ({"model": "krea-2-turbo", "prompt": "x", "size": "7:5"}, "size"),
        ({"model": "krea-2-turbo", "prompt": "x", "quality": "8K"}, "quality"),
        ({"model": "krea-2-medium", "prompt": "x", "moodboards": ["a", "b"]}, "moodboards"),
        ({"model": "krea-2-medium", "prompt": "x", "creativity": "wild"}, "creativity"),
        ({"model": "krea-2-medium", "prompt": "x", "intensity": 101}, "intensity"),
        ({"model": "flux-1-pro", "prompt": "x", "n": 5}, "n"),
        ({"model": "flux-1-pro", "prompt": "x", "size": "big"}, "size"),
        (
            {"model": "flux-1-schnell", "prompt": "x", "num_inference_steps": 20},
            "num_inference_steps",
        ),
        ({"model": "flux-1-dev", "prompt": "x", "nsfw_check": "yes"}, "nsfw_check"),
        ({"model": "krea-1", "prompt": "x", "callback_url": "http://example.com/"}, "callback_url"),
        ({"model": "krea-1", "prompt": "nul \x00 inside"}, "prompt"),
        ({"model": "krea-1", "prompt": "x", "styles": [{"name": "\x00"}]}, "styles"),
        ({"model": "krea-1", "prompt": "x", "seed": 10**30}, "seed"),
        ({"model": "krea-1", "prompt": "x", "seed": 1.5}, "seed"),
        ({"model": None, "prompt": "x"}, "model"),
        (
            {"model": "krea-1", "prompt": "x", "callback_url": "https://u:p@example.com/"},
            "callback_url",
        ),
    ],
)
async def test_invalid_request_names_the_field(
    client: Client, tenant_key: tuple[str, str], body: dict[str, Any], field: str
) -> None:
    _, key = tenant_key
    error = assert_error(await submit(client, key, body), 400, "invalid_request")
    assert error["message"].startswith(f"{field}:"), error["message"]
    assert error["type"] == "invalid_request_error"


async def test_unknown_model_is_a_clear_400(client: Client, tenant_key: tuple[str, str]) -> None:
    _, key = tenant_key
    response = await submit(client, key, {"model": "dall-e-9", "prompt": "x"})
    assert_error(response, 400, "invalid_request", "model: unknown model 'dall-e-9'")


@pytest.mark.parametrize(
    "raw", [b'{"model": "krea-1",', b"not json", b"[1, 2]", b'"text"', b"", b"\xff\xfe"]
)
async def test_malformed_body_is_400_never_500(
    client: Client, tenant_key: tuple[str, str], raw: bytes
) -> None:
    _, key = tenant_key
    response = await client.post(
        "/v1/images/generations",
        content=raw,
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    assert_error(response, 400, "invalid_request")


async def test_oversized_body_is_413_with_the_envelope(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    huge = {"model": "krea-1", "prompt": "x" * 2_000_000}
    assert_error(await submit(client, key, huge), 413, "request_too_large")


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Bearer tg_not-a-real-key", "Basic dXNlcjpwYXNz", "tg_raw-key-without-scheme"],
)
async def test_bad_credentials_are_401(client: Client, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = await client.post(
        "/v1/images/generations", json={"model": "krea-1", "prompt": "x"}, headers=headers
    )
    error = assert_error(response, 401, "unauthorized")
    assert error["type"] == "authentication_error"


async def test_revoked_key_is_refused_within_the_cache_ttl(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200
    listing = await client.get(
        f"/admin/tenants/{tenant_key[0]}/keys", headers=bearer(settings.admin_token)
    )
    key_id = listing.json()["data"][0]["id"]
    revoked = await client.post(
        f"/admin/keys/{key_id}/revoke", headers=bearer(settings.admin_token)
    )
    assert revoked.status_code == 200
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.2)
    assert_error(await client.get("/v1/models", headers=bearer(key)), 401, "unauthorized")


async def test_unknown_route_and_method_use_the_envelope(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    assert_error(await client.get("/v1/nothing-here", headers=bearer(key)), 404, "not_found")
    assert_error(await client.delete("/v1/models", headers=bearer(key)), 405, "method_not_allowed")


async def test_models_lists_the_catalogue_with_capabilities(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    response = await client.get("/v1/models", headers=bearer(key))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) >= {"krea-2-turbo", "flux-1-pro", "stable-diffusion-3-5-large-turbo"}
    turbo = by_id["krea-2-turbo"]
    assert turbo["sizes"]["16:9"] == {"1K": "1344x768", "2K": "2688x1472"}
    assert turbo["qualities"] == ["1K", "2K"]
    assert turbo["images_per_generation"] == 4
    assert set(turbo["settings"]) == {"seed", "nsfw_check"}
    sd = by_id["stable-diffusion-3-5-large-turbo"]
    assert sd["size_format"] == "WxH"
    assert sd["settings"]["num_inference_steps"]["fixed"] == 4
    assert sd["max_images"] == 4


async def test_openapi_document_describes_the_endpoint(client: Client) -> None:
    response = await client.get("/docs/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    operation = spec["paths"]["/v1/images/generations"]["post"]
    schema_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert set(schema["required"]) == {"model", "prompt"}
    assert {"size", "quality", "seed", "callback_url", "n"} <= set(schema["properties"])
    assert "/v1/tasks/{task_id}" in spec["paths"]


async def test_reads_that_arrive_together_share_a_query_and_keep_to_their_tenant(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    """gateway/tasks/reads.py: 30 reads of 3 tasks at once, in fewer than 30 queries; each
    answers its own task; another tenant's read of it is 404 and an unknown id too."""
    tenant_id, key = tenant_key
    ids = [
        (await submit(client, key, {"model": "krea-1", "prompt": f"x{n}"})).json()["id"]
        for n in range(3)
    ]
    pool = await create_hot_pool(settings)
    reads = TaskReads(pool)
    try:
        found = await asyncio.gather(*(reads.read(tenant_id, ids[n % 3]) for n in range(30)))
        assert [task.id for task in found] == [ids[n % 3] for n in range(30)]
        assert {task.tenant_id for task in found} == {tenant_id}
        assert reads.queries < 30
        with pytest.raises(NotFound):
            await reads.read("another-tenant", ids[0])
        with pytest.raises(NotFound):
            await reads.read(tenant_id, "task-unified-0-nosuchtask")
    finally:
        await reads.close()
        await close_hot_pool(pool)
