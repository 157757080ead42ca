"""Tenants and keys over their lifetime: suspension (mid-flight too), deletion, a key's
expiry at its instant, rotation with a grace period, and the CLI for all of it."""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import (
    Sim,
    assert_error,
    bearer,
    make_tenant_key,
    run_cli,
    scalar,
    wait_for_status,
)
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.settings import Settings

Client = AsyncTestClient[Any]
GENERATIONS = "/v1/images/generations"
CHEAP = {"model": "krea-2-medium", "prompt": "a lighthouse"}


def admin(settings: Settings) -> dict[str, str]:
    return bearer(settings.admin_token)


async def key_id_of(client: Client, settings: Settings, tenant_id: str) -> str:
    listed = await client.get(f"/admin/tenants/{tenant_id}/keys", headers=admin(settings))
    return str(listed.json()["data"][0]["id"])


async def ledger_ok(client: Client, settings: Settings) -> None:
    checked = await client.get("/admin/ledger/check", headers=admin(settings))
    assert checked.json() == {"ok": True, "problems": []}


async def submits_refused_as_suspended(client: Client, key: str) -> None:
    assert_error(
        await client.post(GENERATIONS, json=CHEAP, headers=bearer(key)), 403, "tenant_suspended"
    )
    krea = await client.post(
        "/generate/image/krea/krea-2/medium", json={"prompt": "x"}, headers=bearer(key)
    )
    assert krea.status_code == 403, krea.text
    assert "tenant_suspended" in krea.text
    openai = await client.post(
        "/openai/v1/images/generations",
        json={"model": "krea-2-medium", "prompt": "x"},
        headers=bearer(key),
    )
    assert openai.status_code == 403, openai.text
    assert openai.json()["error"]["code"] == "tenant_suspended"


async def test_a_suspended_tenant_reads_and_its_open_task_finishes_but_it_cannot_submit(
    client: Client, settings: Settings, engine: AsyncEngine, simulator: Sim, worker: None
) -> None:
    await simulator.configure(latency=2.0)
    tenant_id, key = await make_tenant_key(settings)
    submitted = await client.post(GENERATIONS, json=CHEAP, headers=bearer(key))
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["id"]
    await wait_for_status(client, key, task_id, {"processing"})

    patched = await client.patch(
        f"/admin/tenants/{tenant_id}", json={"suspended": True}, headers=admin(settings)
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["suspended"] is True
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.2)

    await submits_refused_as_suspended(client, key)
    account = await client.get("/v1/account", headers=bearer(key))
    assert account.status_code == 200
    assert account.json()["suspended"] is True
    listed = await client.get("/v1/tasks", headers=bearer(key))
    assert [t["id"] for t in listed.json()["data"]] == [task_id]

    done = await wait_for_status(client, key, task_id, {"completed", "failed"})
    assert done["status"] == "completed", done
    assert done["usage"]["credits_charged"] == 0.045  # krea-2-medium at its shipped sale price
    assert await scalar(engine, "SELECT held_micros FROM tenants WHERE id = :t", t=tenant_id) == 0
    assert (
        await scalar(engine, "SELECT COUNT(*) FROM tasks WHERE tenant_id = :t", t=tenant_id) == 1
    )  # the refused submits left nothing
    await ledger_ok(client, settings)

    resumed = await client.patch(
        f"/admin/tenants/{tenant_id}", json={"suspended": False}, headers=admin(settings)
    )
    assert resumed.json()["suspended"] is False
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.2)
    assert (await client.post(GENERATIONS, json=CHEAP, headers=bearer(key))).status_code == 200


async def test_patch_renames_and_regroups_and_names_bad_fields(
    client: Client, settings: Settings
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    other_id, _ = await make_tenant_key(settings)
    other_name = (await client.get("/admin/tenants", headers=admin(settings))).json()["data"]
    taken = next(t["name"] for t in other_name if t["id"] == other_id)
    url = f"/admin/tenants/{tenant_id}"
    changed = await client.patch(
        url, json={"name": f"renamed-{tenant_id}", "user_group": "vip"}, headers=admin(settings)
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["name"] == f"renamed-{tenant_id}"
    assert changed.json()["user_group"] == "vip"
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.2)
    account = await client.get("/v1/account", headers=bearer(key))
    assert account.json()["user_group"] == "vip"
    assert_error(
        await client.patch(url, json={"name": taken}, headers=admin(settings)), 409, "conflict"
    )
    assert_error(
        await client.patch(url, json={"user_group": "no spaces"}, headers=admin(settings)),
        400,
        "invalid_request",
        "user_group",
    )
    assert_error(
        await client.patch(url, json={"suspended": "yes"}, headers=admin(settings)),
        400,
        "invalid_request",
        "suspended",
    )
    assert_error(
        await client.patch(url, json={"colour": 1}, headers=admin(settings)),
        400,
        "invalid_request",
        "colour",
    )
    assert_error(
        await client.patch("/admin/tenants/ten_nope", json={}, headers=admin(settings)),
        404,
        "not_found",
    )


async def test_deleting_a_tenant_suspends_it_revokes_its_keys_and_keeps_its_ledger(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    assert (await client.post(GENERATIONS, json=CHEAP, headers=bearer(key))).status_code == 200
    ledger_rows = await scalar(
        engine, "SELECT COUNT(*) FROM ledger_entries WHERE tenant_id = :t", t=tenant_id
    )
    deleted = await client.delete(f"/admin/tenants/{tenant_id}", headers=admin(settings))
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["suspended"] is True
    assert deleted.json()["deleted_at"] is not None
    keys = (await client.get(f"/admin/tenants/{tenant_id}/keys", headers=admin(settings))).json()
    assert all(k["revoked_at"] is not None for k in keys["data"])
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.2)
    assert_error(await client.get("/v1/account", headers=bearer(key)), 401, "unauthorized")
    assert (
        await scalar(
            engine, "SELECT COUNT(*) FROM ledger_entries WHERE tenant_id = :t", t=tenant_id
        )
        == ledger_rows
    )
    assert_error(
        await client.patch(
            f"/admin/tenants/{tenant_id}", json={"suspended": False}, headers=admin(settings)
        ),
        409,
        "conflict",
        "deleted",
    )
    assert_error(
        await client.post(f"/admin/tenants/{tenant_id}/keys", headers=admin(settings)),
        409,
        "conflict",
    )


@pytest.fixture
async def long_cache_client(settings: Settings) -> AsyncIterator[Client]:
    """A gateway whose key cache keeps every entry for a minute: what a key does at its
    expiry is then decided from the cached entry alone."""
    slow = settings.model_copy(update={"key_cache_ttl_seconds": 60.0})
    async with AsyncTestClient(app=create_app(slow), base_url="http://testserver.local") as c:
        yield c


async def test_a_key_stops_at_its_expiry_even_while_cached(
    long_cache_client: Client, settings: Settings
) -> None:
    client = long_cache_client
    tenant_id, _ = await make_tenant_key(settings)
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    issued = await client.post(
        f"/admin/tenants/{tenant_id}/keys",
        json={"name": "short", "expires_at": expires.isoformat()},
        headers=admin(settings),
    )
    assert issued.status_code == 201, issued.text
    assert datetime.fromisoformat(issued.json()["expires_at"]) == expires
    key = issued.json()["key"]
    assert (await client.get("/v1/account", headers=bearer(key))).status_code == 200  # cached
    # Just before the instant: still good.
    await asyncio.sleep(max(0.0, expires.timestamp() - time.time() - 0.25))
    assert (await client.get("/v1/account", headers=bearer(key))).status_code == 200
    # At the instant: refused, though the cache entry has 58 s to live.
    await asyncio.sleep(max(0.0, expires.timestamp() - time.time()))
    error = assert_error(await client.get("/v1/account", headers=bearer(key)), 401, "key_expired")
    assert error["type"] == "authentication_error"
    assert_error(
        await client.post(GENERATIONS, json=CHEAP, headers=bearer(key)), 401, "key_expired"
    )


async def test_an_expiry_in_the_past_or_without_an_offset_is_a_400(
    client: Client, settings: Settings
) -> None:
    tenant_id, _ = await make_tenant_key(settings)
    url = f"/admin/tenants/{tenant_id}/keys"
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    assert_error(
        await client.post(url, json={"expires_at": past}, headers=admin(settings)),
        400,
        "invalid_request",
        "expires_at",
    )
    naive = "2099-01-01T00:00:00"
    assert_error(
        await client.post(url, json={"expires_at": naive}, headers=admin(settings)),
        400,
        "invalid_request",
        "expires_at",
    )


async def test_rotation_gives_a_new_secret_and_the_old_one_works_for_the_grace_period(
    client: Client, settings: Settings
) -> None:
    tenant_id, old = await make_tenant_key(settings)
    key_id = await key_id_of(client, settings, tenant_id)
    assert (await client.get("/v1/account", headers=bearer(old))).status_code == 200
    rotated = await client.post(
        f"/admin/keys/{key_id}/rotate", json={"grace_seconds": 2}, headers=admin(settings)
    )
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["key"]
    assert new != old
    assert rotated.json()["id"] == key_id
    grace_ends = datetime.fromisoformat(rotated.json()["previous_secret_expires_at"])
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.2)  # both read afresh
    for secret in (old, new):
        answer = await client.get("/v1/account", headers=bearer(secret))
        assert answer.status_code == 200, answer.text
        assert answer.json()["key"]["id"] == key_id  # the same key: its limits and spend
    await asyncio.sleep(max(0.0, grace_ends.timestamp() - time.time()) + 0.05)
    assert_error(await client.get("/v1/account", headers=bearer(old)), 401, "key_expired")
    assert (await client.get("/v1/account", headers=bearer(new))).status_code == 200

    # Without a body: the default grace (a day).
    again = await client.post(f"/admin/keys/{key_id}/rotate", headers=admin(settings))
    ends = datetime.fromisoformat(again.json()["previous_secret_expires_at"])
    expected = datetime.now(UTC) + timedelta(seconds=settings.key_rotation_grace_seconds)
    assert abs((ends - expected).total_seconds()) < 60
    assert_error(
        await client.post(
            f"/admin/keys/{key_id}/rotate", json={"grace_seconds": -1}, headers=admin(settings)
        ),
        400,
        "invalid_request",
        "grace_seconds",
    )
    await client.post(f"/admin/keys/{key_id}/revoke", headers=admin(settings))
    assert_error(
        await client.post(f"/admin/keys/{key_id}/rotate", headers=admin(settings)), 409, "conflict"
    )
    assert_error(
        await client.post("/admin/keys/key_nope/rotate", headers=admin(settings)), 404, "not_found"
    )


async def test_cli_changes_suspends_deletes_tenants_and_issues_and_rotates_keys(
    settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, _ = await make_tenant_key(settings)

    async def cli(*args: str) -> Any:
        code, out, err = await run_cli(settings, *args)
        assert code == 0, err
        return json.loads(out)

    assert (await cli("tenants", "suspend", tenant_id))["suspended"] is True
    assert (await cli("tenants", "resume", tenant_id))["suspended"] is False
    updated = await cli("tenants", "update", tenant_id, "--group", "vip")
    assert updated["user_group"] == "vip"
    expires = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    issued = await cli("keys", "issue", tenant_id, "--expires-at", expires, "--no-key-management")
    assert issued["can_manage_keys"] is False
    assert datetime.fromisoformat(issued["expires_at"]) == datetime.fromisoformat(expires)
    rotated = await cli("keys", "rotate", issued["id"], "--grace", "60")
    assert rotated["key"] != issued["key"]
    assert rotated["previous_secret_expires_at"]
    code, _, err = await run_cli(settings, "keys", "issue", tenant_id, "--expires-at", "soon")
    assert code == 2
    assert "--expires-at" in err
    deleted = await cli("tenants", "delete", tenant_id, "--yes")
    assert deleted["deleted_at"] is not None
    assert (
        await scalar(
            engine,
            "SELECT COUNT(*) FROM api_keys WHERE tenant_id = :t AND revoked_at IS NULL",
            t=tenant_id,
        )
        == 0
    )
