"""Redemption codes: made once and stored as hashes, redeemed once however many try at
once, clear errors for unknown, used and expired codes, attempts limited per key."""

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from conftest import assert_error, bearer, make_tenant_key, run_cli, scalar, serve_app, totals
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.settings import Settings
from gateway.tenants.models import new_id

Client = AsyncTestClient[Any]
REDEEM = "/v1/account/redeem"


def admin(settings: Settings) -> dict[str, str]:
    return bearer(settings.admin_token)


async def make_codes(client: Client, settings: Settings, **body: Any) -> dict[str, Any]:
    made = await client.post(
        "/admin/redemption-codes",
        json={"amount": "2.5", "count": 1, **body},
        headers=admin(settings),
    )
    assert made.status_code == 201, made.text
    result: dict[str, Any] = made.json()
    return result


async def test_codes_are_shown_once_stored_as_hashes_and_redeemed_into_the_ledger(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    batch = await make_codes(client, settings, count=3, note="launch promo")
    assert len(batch["codes"]) == 3
    assert len(set(batch["codes"])) == 3
    assert batch["amount"] == 2.5
    async with engine.connect() as conn:
        stored = await conn.execute(
            text("SELECT * FROM redemption_codes WHERE batch_id = :b"), {"b": batch["id"]}
        )
        rows = json.dumps([list(map(str, r)) for r in stored])
    assert rows.count("rc_") == 3
    for code in batch["codes"]:
        assert code not in rows
        assert code.replace("-", "") not in rows

    tenant_id, key = await make_tenant_key(settings)
    before = await totals(engine, tenant_id)
    # Typed in lower case without its dashes: the same code.
    typed = batch["codes"][0].lower().replace("-", "")
    redeemed = await client.post(REDEEM, json={"code": typed}, headers=bearer(key))
    assert redeemed.status_code == 200, redeemed.text
    assert redeemed.json()["credited"] == 2.5
    assert await totals(engine, tenant_id) == (before[0] + 2_500_000, before[1])
    topups = await scalar(
        engine,
        "SELECT COUNT(*) FROM ledger_entries WHERE tenant_id = :t AND kind = 'topup' "
        "AND idempotency_key LIKE 'redeem:%'",
        t=tenant_id,
    )
    assert topups == 1

    listed = (await client.get("/admin/redemption-codes", headers=admin(settings))).json()
    [mine] = [b for b in listed["data"] if b["id"] == batch["id"]]
    assert mine["note"] == "launch promo"
    assert mine["redeemed"] == 1
    used = [c for c in mine["codes"] if c["redeemed_at"]]
    assert len(used) == 1
    assert used[0]["tenant_id"] == tenant_id
    assert used[0]["key_id"].startswith("key_")
    assert batch["codes"][0] not in json.dumps(listed)  # never shown again


async def test_unknown_used_and_expired_codes_are_clear_4xx_and_credit_nothing(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    batch = await make_codes(client, settings, count=2)
    first, second = batch["codes"]
    assert (await client.post(REDEEM, json={"code": first}, headers=bearer(key))).status_code == 200
    before = await totals(engine, tenant_id)

    assert_error(
        await client.post(REDEEM, json={"code": "TG-NOPE0-NOPE0-NOPE0-NOPE0"}, headers=bearer(key)),
        404,
        "redemption_code_not_found",
    )
    assert_error(
        await client.post(REDEEM, json={"code": first}, headers=bearer(key)),
        409,
        "redemption_code_used",
    )
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE redemption_batches SET expires_at = now() - interval '1 s' WHERE id = :b"),
            {"b": batch["id"]},
        )
    assert_error(
        await client.post(REDEEM, json={"code": second}, headers=bearer(key)),
        410,
        "redemption_code_expired",
    )
    assert_error(
        await client.post(REDEEM, json={"code": ""}, headers=bearer(key)),
        400,
        "invalid_request",
        "code",
    )
    assert_error(
        await client.post(REDEEM, json={"coupon": "x"}, headers=bearer(key)),
        400,
        "invalid_request",
        "coupon",
    )
    assert await totals(engine, tenant_id) == before


async def test_making_codes_names_bad_fields(client: Client, settings: Settings) -> None:
    url = "/admin/redemption-codes"
    for body, field in (
        ({"amount": "0", "count": 1}, "amount"),
        ({"amount": "-1", "count": 1}, "amount"),
        ({"amount": "1", "count": 0}, "count"),
        ({"amount": "1", "count": 1001}, "count"),
        ({"amount": "1", "expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),
        ({"amount": "1", "expires_at": "2099-01-01T00:00:00"}, "expires_at"),
    ):
        answer = await client.post(url, json=body, headers=admin(settings))
        assert_error(answer, 400, "invalid_request", field)
    assert (await client.post(url, json={"amount": "1"})).status_code == 401


async def test_one_code_redeemed_100_times_at_once_credits_exactly_once(
    settings: Settings, engine: AsyncEngine
) -> None:
    fast = settings.model_copy(update={"redeem_rate_limit_per_minute": 1000})
    tenant_id, key = await make_tenant_key(fast)
    before = await totals(engine, tenant_id)
    async with serve_app(fast) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        made = await http.post(
            "/admin/redemption-codes", json={"amount": "7", "count": 1}, headers=admin(fast)
        )
        [code] = made.json()["codes"]
        answers = await asyncio.gather(
            *(http.post(REDEEM, json={"code": code}, headers=bearer(key)) for _ in range(100))
        )
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] + [409] * 99, statuses
        checked = await http.get("/admin/ledger/check", headers=admin(fast))
        assert checked.json() == {"ok": True, "problems": []}
    assert await totals(engine, tenant_id) == (before[0] + 7_000_000, before[1])


async def test_redemption_attempts_are_limited_per_key(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    limit = settings.redeem_rate_limit_per_minute
    batch = await make_codes(client, settings)
    for _ in range(limit):
        wrong = {"code": f"TG-{new_id('x')}"}
        assert (await client.post(REDEEM, json=wrong, headers=bearer(key))).status_code == 404
    before = await totals(engine, tenant_id)
    # Past the limit even a good code is refused, and not used up.
    refused = await client.post(REDEEM, json={"code": batch["codes"][0]}, headers=bearer(key))
    assert_error(refused, 429, "rate_limit_exceeded", "redemption")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert await totals(engine, tenant_id) == before
    # Another key is counted apart.
    other = await client.post(f"/admin/tenants/{tenant_id}/keys", headers=admin(settings))
    answer = await client.post(
        REDEEM, json={"code": batch["codes"][0]}, headers=bearer(other.json()["key"])
    )
    assert answer.status_code == 200, answer.text


async def test_cli_creates_and_lists_codes(settings: Settings, client: Client) -> None:
    expires = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    code, out, err = await run_cli(
        settings,
        "codes",
        "create",
        "--amount",
        "1.25",
        "--count",
        "2",
        "--expires-at",
        expires,
        "--note",
        "cli batch",
    )
    assert code == 0, err
    made = json.loads(out)
    assert len(made["codes"]) == 2
    assert made["amount"] == 1.25
    _, key = await make_tenant_key(settings)
    redeemed = await client.post(REDEEM, json={"code": made["codes"][1]}, headers=bearer(key))
    assert redeemed.status_code == 200, redeemed.text
    code, out, err = await run_cli(settings, "codes", "list")
    assert code == 0, err
    [batch] = [b for b in json.loads(out) if b["id"] == made["id"]]
    assert batch["redeemed"] == 1
    assert made["codes"][0] not in out
    code, _, err = await run_cli(settings, "codes", "create", "--amount", "lots")
    assert code == 2
    assert "--amount" in err
