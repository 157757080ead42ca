"""The tenant's self-service API: account, usage (JSON and CSV), its task list with cursor
pagination and filters, its own keys with their scope; one tenant never sees another's."""

import asyncio
import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import assert_error, bearer, make_tenant_key
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import InvalidRequest
from gateway.settings import Settings
from gateway.tasks import lifecycle

Client = AsyncTestClient[Any]
GENERATIONS = "/v1/images/generations"


def admin(settings: Settings) -> dict[str, str]:
    return bearer(settings.admin_token)


async def submit(client: Client, key: str, model: str = "krea-2-medium") -> str:
    answer = await client.post(
        GENERATIONS, json={"model": model, "prompt": "a harbour"}, headers=bearer(key)
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


async def all_pages(client: Client, key: str, query: str = "", limit: int = 3) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        url = f"/v1/tasks?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        page = await client.get(url, headers=bearer(key))
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["data"]) <= limit
        seen += [t["id"] for t in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen


async def test_account_shows_tenant_group_credits_limits_and_budgets(
    client: Client, settings: Settings
) -> None:
    tenant_id, key = await make_tenant_key(settings, credits_micros=5_000_000)
    await submit(client, key)  # holds 0.045 (krea-2-medium)
    account = await client.get("/v1/account", headers=bearer(key))
    assert account.status_code == 200, account.text
    body = account.json()
    assert body["tenant"]["id"] == tenant_id
    assert body["user_group"] == "default"
    assert body["suspended"] is False
    assert (body["balance"], body["held"], body["available"]) == (5, 0.045, 4.955)
    assert body["available_micros"] == 4_955_000
    assert set(body["limits"]) == {"tenant", "key", "allowed_models"}
    assert body["limits"]["tenant"]["in_flight"] == 1
    assert set(body["budgets"]) == {"total", "daily", "monthly"}
    assert body["budgets"]["total"]["spent"] == 0.045
    assert body["key"]["can_manage_keys"] is True
    assert_error(await client.get("/v1/account"), 401, "unauthorized")


async def test_task_list_pages_newest_first_without_gaps_or_repeats(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    _, key = await make_tenant_key(settings)
    made = [await submit(client, key) for _ in range(7)]
    assert await all_pages(client, key) == made[::-1]
    # Tasks made in the same microsecond still page exactly once each (id breaks ties).
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE tasks SET created_at = now() WHERE id = ANY(:ids)"), {"ids": made}
        )
    paged = await all_pages(client, key, limit=2)
    assert sorted(paged) == sorted(made)
    assert paged == sorted(made, reverse=True)
    assert_error(
        await client.get("/v1/tasks?cursor=not-a-cursor", headers=bearer(key)),
        400,
        "invalid_request",
        "cursor",
    )
    assert_error(await client.get("/v1/tasks?limit=0", headers=bearer(key)), 400, "invalid_request")


async def test_task_list_filters_by_status_model_and_dates(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    _, key = await make_tenant_key(settings)
    medium = [await submit(client, key) for _ in range(2)]
    turbo = await submit(client, key, "krea-2-turbo")
    cancelled = await client.post(f"/v1/tasks/{medium[0]}/cancel", headers=bearer(key))
    assert cancelled.status_code == 200, cancelled.text
    old = datetime.now(UTC) - timedelta(days=10)
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE tasks SET created_at = :old WHERE id = :id"), {"old": old, "id": turbo}
        )

    assert await all_pages(client, key, "&model=krea-2-turbo") == [turbo]
    assert await all_pages(client, key, "&status=cancelled") == [medium[0]]
    assert await all_pages(client, key, "&status=pending&model=krea-2-medium") == [medium[1]]
    today = datetime.now(UTC).date()
    assert sorted(await all_pages(client, key, f"&since={today}")) == sorted(medium)
    day = old.date().isoformat()
    assert await all_pages(client, key, f"&since={day}&until={day}") == [turbo]
    assert_error(
        await client.get("/v1/tasks?status=done", headers=bearer(key)),
        400,
        "invalid_request",
        "status",
    )
    assert_error(
        await client.get(f"/v1/tasks?since={today}&until={day}", headers=bearer(key)),
        400,
        "invalid_request",
        "since",
    )


async def test_usage_per_day_and_model_as_json_and_csv(client: Client, settings: Settings) -> None:
    _, key = await make_tenant_key(settings)
    for _ in range(2):
        await submit(client, key)
    await submit(client, key, "krea-2-turbo")
    answer = await client.get("/v1/usage", headers=bearer(key))
    assert answer.status_code == 200, answer.text
    rows = {r["model"]: r for r in answer.json()["data"]}
    assert rows["krea-2-medium"]["tasks"] == 2
    assert rows["krea-2-turbo"]["tasks"] == 1
    assert "upstream_cost" not in rows["krea-2-medium"]  # the operator's, not the tenant's
    assert "margin" not in rows["krea-2-medium"]

    by_header = await client.get("/v1/usage", headers={**bearer(key), "Accept": "text/csv"})
    by_query = await client.get("/v1/usage?format=csv", headers=bearer(key))
    for sheet in (by_header, by_query):
        assert sheet.status_code == 200, sheet.text
        assert sheet.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(sheet.text)))
        assert {r["model"]: int(r["tasks"]) for r in table} == {
            "krea-2-medium": 2,
            "krea-2-turbo": 1,
        }
        assert "margin" not in sheet.text
    assert_error(
        await client.get("/v1/usage?since=2026-02-01&until=2026-01-01", headers=bearer(key)),
        400,
        "invalid_request",
        "since",
    )


async def test_usage_shows_the_tenant_its_refunds(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    _, key = await make_tenant_key(settings)
    task_id = await submit(client, key)
    async with engine.begin() as conn:
        assert await lifecycle.claim(conn, task_id, 0, 30) is not None
        assert await lifecycle.complete(conn, task_id, 0, [f"{task_id}/0.png"], 3600)
    refund = await client.post(
        f"/admin/tasks/{task_id}/refund",
        json={"amount": "0.015", "reason": "blurry"},
        headers=admin(settings),
    )
    assert refund.status_code == 200, refund.text
    row = (await client.get("/v1/usage", headers=bearer(key))).json()["data"][0]
    assert (row["charged_micros"], row["refunded_micros"], row["net_micros"]) == (
        45_000,
        15_000,
        30_000,
    )
    sheet = (await client.get("/v1/usage?format=csv", headers=bearer(key))).text
    assert sheet.splitlines() == [
        "day,model,tasks,completed,failed,images,charged,refunded,adjusted,net",
        f"{row['day']},krea-2-medium,1,1,0,1,0.045,0.015,0,0.03",
    ]


async def test_a_tenant_never_sees_another_tenants_tasks_keys_or_usage(
    client: Client, settings: Settings
) -> None:
    _, key_a = await make_tenant_key(settings)
    tenant_b, key_b = await make_tenant_key(settings)
    task_a = await submit(client, key_a)
    task_b = await submit(client, key_b, "krea-2-turbo")

    assert await all_pages(client, key_a) == [task_a]
    assert await all_pages(client, key_b) == [task_b]
    usage_a = (await client.get("/v1/usage", headers=bearer(key_a))).json()["data"]
    assert [r["model"] for r in usage_a] == ["krea-2-medium"]
    csv_a = (await client.get("/v1/usage?format=csv", headers=bearer(key_a))).text
    assert "krea-2-turbo" not in csv_a
    assert_error(await client.get(f"/v1/tasks/{task_b}", headers=bearer(key_a)), 404, "not_found")

    keys_a = (await client.get("/v1/keys", headers=bearer(key_a))).json()["data"]
    keys_b = (await client.get("/v1/keys", headers=bearer(key_b))).json()["data"]
    assert {k["tenant_id"] for k in keys_a} != {k["tenant_id"] for k in keys_b}
    assert {k["id"] for k in keys_a}.isdisjoint({k["id"] for k in keys_b})
    b_key_id = keys_b[0]["id"]
    assert_error(
        await client.post(f"/v1/keys/{b_key_id}/revoke", headers=bearer(key_a)), 404, "not_found"
    )
    assert (await client.get("/v1/account", headers=bearer(key_b))).json()["tenant"][
        "id"
    ] == tenant_b
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.2)
    assert (await client.get("/v1/account", headers=bearer(key_b))).status_code == 200


async def test_own_keys_are_shown_once_never_wider_and_revocable(
    client: Client, settings: Settings
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    my_id = (await client.get("/v1/account", headers=bearer(key))).json()["key"]["id"]
    limited = await client.patch(
        f"/admin/keys/{my_id}/limits",
        json={"allowed_models": ["krea-2-medium", "krea-2-turbo"], "budget_daily": "5"},
        headers=admin(settings),
    )
    assert limited.status_code == 200, limited.text
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.2)

    made = await client.post(
        "/v1/keys",
        json={"name": "ci", "allowed_models": ["krea-2-medium"], "budget_daily": "1.5"},
        headers=bearer(key),
    )
    assert made.status_code == 201, made.text
    child = made.json()
    assert child["key"].startswith("tg_")
    assert child["tenant_id"] == tenant_id
    assert child["allowed_models"] == ["krea-2-medium"]
    assert child["budgets"]["daily"] == 1.5
    assert child["can_manage_keys"] is False
    listed = await client.get("/v1/keys", headers=bearer(key))
    assert child["key"] not in listed.text
    assert child["id"] in {k["id"] for k in listed.json()["data"]}
    # Left out: the maker's own limits.
    inherited = (await client.post("/v1/keys", json={}, headers=bearer(key))).json()
    assert inherited["allowed_models"] == ["krea-2-medium", "krea-2-turbo"]
    assert inherited["budgets"]["daily"] == 5

    for body, field in (
        ({"allowed_models": ["flux-1-pro"]}, "allowed_models"),
        ({"allowed_models": ["no-such-model"]}, "allowed_models"),
        ({"budget_daily": "6"}, "budget_daily"),
        ({"budget_total": "-1"}, "budget_total"),
        ({"expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "2099-01-01T00:00:00"}, "expires_at"),
    ):
        refused = await client.post("/v1/keys", json=body, headers=bearer(key))
        assert_error(refused, 400, "invalid_request", field)

    # The new key works for what it may do, and stops when revoked.
    assert_error(
        await client.post(
            GENERATIONS, json={"model": "krea-2-turbo", "prompt": "x"}, headers=bearer(child["key"])
        ),
        403,
        "model_access_denied",
    )
    assert (
        await client.post(
            GENERATIONS,
            json={"model": "krea-2-medium", "prompt": "x"},
            headers=bearer(child["key"]),
        )
    ).status_code == 200
    revoked = await client.post(f"/v1/keys/{child['id']}/revoke", headers=bearer(key))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.2)
    assert_error(await client.get("/v1/account", headers=bearer(child["key"])), 401, "unauthorized")


async def test_a_key_made_with_an_expiry_makes_keys_that_expire_no_later(
    client: Client, settings: Settings
) -> None:
    tenant_id, _ = await make_tenant_key(settings)
    ends = datetime.now(UTC) + timedelta(hours=1)
    parent = await client.post(
        f"/admin/tenants/{tenant_id}/keys",
        json={"expires_at": ends.isoformat()},
        headers=admin(settings),
    )
    secret = parent.json()["key"]
    child = (await client.post("/v1/keys", json={}, headers=bearer(secret))).json()
    assert datetime.fromisoformat(child["expires_at"]) == ends
    later = (ends + timedelta(minutes=1)).isoformat()
    assert_error(
        await client.post("/v1/keys", json={"expires_at": later}, headers=bearer(secret)),
        400,
        "invalid_request",
        "expires_at",
    )


async def test_a_key_without_the_scope_cannot_manage_keys_but_reads_and_submits(
    client: Client, settings: Settings
) -> None:
    tenant_id, _ = await make_tenant_key(settings)
    issued = await client.post(
        f"/admin/tenants/{tenant_id}/keys",
        json={"name": "worker", "can_manage_keys": False},
        headers=admin(settings),
    )
    assert issued.json()["can_manage_keys"] is False
    scoped = issued.json()["key"]
    assert_error(await client.get("/v1/keys", headers=bearer(scoped)), 403, "forbidden", "manage")
    assert_error(await client.post("/v1/keys", json={}, headers=bearer(scoped)), 403, "forbidden")
    assert_error(
        await client.post(f"/v1/keys/{issued.json()['id']}/revoke", headers=bearer(scoped)),
        403,
        "forbidden",
    )
    assert (await client.get("/v1/account", headers=bearer(scoped))).status_code == 200
    assert (await client.get("/v1/tasks", headers=bearer(scoped))).status_code == 200
    assert (await client.get("/v1/usage", headers=bearer(scoped))).status_code == 200
    await submit(client, scoped)
    # A key a tenant makes has no key management unless asked for.
    _, full = await make_tenant_key(settings)
    child = (await client.post("/v1/keys", json={}, headers=bearer(full))).json()
    assert_error(await client.get("/v1/keys", headers=bearer(child["key"])), 403, "forbidden")
    manager = (
        await client.post("/v1/keys", json={"can_manage_keys": True}, headers=bearer(full))
    ).json()
    assert (await client.get("/v1/keys", headers=bearer(manager["key"]))).status_code == 200


async def test_the_services_serve_a_caller_that_is_not_a_key(
    client: Client, settings: Settings
) -> None:
    """What the web console calls for a signed-in user: by tenant id, with no key."""
    from gateway.account.service import tenant_account
    from gateway.db import create_engine, session_factory, transaction
    from gateway.errors import NotFound
    from gateway.tenants.keys import OwnKeyRequest, create_tenant_key, revoke_tenant_key
    from pricing.catalog import load_catalog

    tenant_id, _ = await make_tenant_key(settings)
    other_id, _ = await make_tenant_key(settings)
    await client.patch(
        f"/admin/tenants/{tenant_id}/limits",
        json={"allowed_models": ["krea-2-medium"]},
        headers=admin(settings),
    )
    catalog = load_catalog()
    engine = create_engine(settings)
    try:
        async with transaction(session_factory(engine)) as session:
            found = await tenant_account(session, settings, tenant_id)
            assert found["tenant"]["id"] == tenant_id
            assert found["limits"]["allowed_models"] == ["krea-2-medium"]
            assert "key" not in found
            issued = await create_tenant_key(
                session, catalog, tenant_id, OwnKeyRequest(name="console")
            )
            assert issued.key.allowed_models == ["krea-2-medium"]  # bounded by the tenant
            with pytest.raises(InvalidRequest):
                await create_tenant_key(
                    session, catalog, tenant_id, OwnKeyRequest(allowed_models=["krea-2-turbo"])
                )
        async with transaction(session_factory(engine)) as session:
            with pytest.raises(NotFound):
                await revoke_tenant_key(session, other_id, issued.key.id)
            revoked = await revoke_tenant_key(session, tenant_id, issued.key.id)
            assert revoked.revoked_at is not None
    finally:
        await engine.dispose()
    turbo = await client.post(
        GENERATIONS, json={"model": "krea-2-turbo", "prompt": "x"}, headers=bearer(issued.secret)
    )
    assert turbo.status_code == 401  # revoked (never cached)
