"""The admin API: its own credential, tenants, keys shown once, tasks."""

from typing import Any

import pytest
from conftest import bearer
from litestar.testing import AsyncTestClient
from sqlalchemy import text

from gateway.db import create_engine
from gateway.settings import Settings
from gateway.tenants.models import hash_key

Client = AsyncTestClient[Any]


@pytest.mark.parametrize("header", [None, "Bearer wrong-admin-token", "Bearer tg_tenantkey"])
async def test_admin_routes_need_the_admin_token(client: Client, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = await client.get("/admin/tenants", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


async def test_a_tenant_key_is_not_an_admin_token(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    response = await client.get("/admin/tenants", headers=bearer(tenant_key[1]))
    assert response.status_code == 401


async def test_issue_list_revoke_a_key_through_the_api(client: Client, settings: Settings) -> None:
    admin = bearer(settings.admin_token)
    created = await client.post("/admin/tenants", json={"name": "acme-admin-api"}, headers=admin)
    assert created.status_code == 201, created.text
    tenant = created.json()
    assert tenant["user_group"] == "default"
    duplicate = await client.post("/admin/tenants", json={"name": "acme-admin-api"}, headers=admin)
    assert duplicate.status_code == 409

    issued = await client.post(
        f"/admin/tenants/{tenant['id']}/keys", json={"name": "ci"}, headers=admin
    )
    assert issued.status_code == 201
    secret = issued.json()["key"]
    assert secret.startswith("tg_")
    assert len(secret) >= 40
    assert issued.json()["prefix"] == secret[:10]

    listed = await client.get(f"/admin/tenants/{tenant['id']}/keys", headers=admin)
    [key] = listed.json()["data"]
    assert "key" not in key  # the secret is shown once, never listed
    assert secret not in listed.text

    # Only the hash is stored.
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            stored = (
                await conn.execute(
                    text("SELECT key_hash FROM api_keys WHERE id = :id"), {"id": key["id"]}
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    assert stored == hash_key(secret)
    assert secret not in stored

    assert (await client.get("/v1/models", headers=bearer(secret))).status_code == 200
    revoked = await client.post(f"/admin/keys/{key['id']}/revoke", headers=admin)
    assert revoked.json()["revoked_at"] is not None


async def test_admin_errors_use_the_envelope(client: Client, settings: Settings) -> None:
    admin = bearer(settings.admin_token)
    missing = await client.post("/admin/tenants/ten_nope/keys", headers=admin)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    bad = await client.post("/admin/tenants", json={"name": 5}, headers=admin)
    assert bad.status_code == 400
    assert bad.json()["error"]["message"].startswith("name:")
    extra = await client.post("/admin/tenants", json={"name": "x", "owner": "y"}, headers=admin)
    assert extra.json()["error"]["message"] == "owner: unknown field"


async def test_admin_lists_tasks_by_tenant(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    tenant_id, key = tenant_key
    submitted = await client.post(
        "/v1/images/generations", json={"model": "krea-1", "prompt": "x"}, headers=bearer(key)
    )
    task_id = submitted.json()["id"]
    listed = await client.get(
        f"/admin/tasks?tenant_id={tenant_id}", headers=bearer(settings.admin_token)
    )
    assert listed.status_code == 200
    assert [t["id"] for t in listed.json()["data"]] == [task_id]
    bad_limit = await client.get("/admin/tasks?limit=0", headers=bearer(settings.admin_token))
    assert bad_limit.status_code == 400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x" * 201}, "name"),
        ({"name": "nul\x00name"}, "name"),
        ({"name": "ok-name", "user_group": "no spaces allowed"}, "user_group"),
    ],
)
async def test_admin_input_that_cannot_be_stored_is_a_400(
    client: Client, settings: Settings, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/admin/tenants", json=body, headers=bearer(settings.admin_token))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith(f"{field}:")
