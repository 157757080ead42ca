"""The console's pages for what issues 15 and 16 added, over plain HTTP: redeeming a
code, suspending/resuming/deleting a tenant, key expiry and scope, the playground's
hidden key, and the operator's prices, groups and exchange rates. Each page is checked
for who may use it and that a post without the CSRF token is refused."""

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from conftest import bearer, make_tenant_key
from console_helpers import log_in, make_user
from litestar.testing import AsyncTestClient
from sqlalchemy import text

from gateway.app import create_app
from gateway.db import create_engine
from gateway.settings import Settings
from pricing.catalog import load_catalog

Client = AsyncTestClient[Any]


async def new_client(settings: Settings) -> Client:
    return AsyncTestClient(app=create_app(settings), base_url="http://testserver.local")


async def make_codes(client: Client, settings: Settings, amount: str, count: int) -> list[str]:
    made = await client.post(
        "/admin/redemption-codes",
        json={"amount": amount, "count": count},
        headers=bearer(settings.admin_token),
    )
    assert made.status_code == 201, made.text
    codes: list[str] = made.json()["codes"]
    return codes


def balance_on(page: str) -> str:
    found = re.search(r'id="balance">([^<]+)<', page)
    assert found, "no balance on the page"
    return found.group(1)


async def test_a_tenant_redeems_a_code_and_sees_each_refusal(
    client: Client, settings: Settings
) -> None:
    tenant_id, _ = await make_tenant_key(settings, credits_micros=1_000_000)  # 1 credit
    codes = await make_codes(client, settings, "2.5", 2)
    token = await log_in(client, await make_user(settings, "member", tenant_id))
    page = await client.get("/console/redeem")
    assert page.status_code == 200
    assert balance_on(page.text) == "1"
    # Without the CSRF token: refused, nothing credited.
    assert (await client.post("/console/redeem", data={"code": codes[0]})).status_code == 403
    done = await client.post("/console/redeem", data={"code": codes[0], "_csrf": token})
    assert done.status_code == 200, done.text
    assert "2.5 credits added" in done.text
    assert balance_on(done.text) == "3.5"
    assert balance_on((await client.get("/console/overview")).text) == "3.5"
    used = await client.post("/console/redeem", data={"code": codes[0], "_csrf": token})
    assert used.status_code == 409
    assert "already been redeemed (redemption_code_used)" in used.text
    unknown = await client.post("/console/redeem", data={"code": "TG-NOPE", "_csrf": token})
    assert unknown.status_code == 404
    assert "redemption_code_not_found" in unknown.text
    # An expired batch: its code is refused and credits nothing.
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "UPDATE redemption_batches SET expires_at = now() - interval '1 minute' "
                    "WHERE id = (SELECT batch_id FROM redemption_codes "
                    "WHERE redeemed_by_tenant_id = :t)"
                ),
                {"t": tenant_id},
            )
    finally:
        await engine.dispose()
    expired = await client.post("/console/redeem", data={"code": codes[1], "_csrf": token})
    assert expired.status_code == 410
    assert "redemption_code_expired" in expired.text
    assert balance_on(expired.text) == "3.5"


async def test_redemption_attempts_are_limited_per_console_user(
    settings: Settings,
) -> None:
    tenant_id, _ = await make_tenant_key(settings)
    strict = settings.model_copy(update={"redeem_rate_limit_per_minute": 2})
    async with await new_client(strict) as client:
        codes = await make_codes(client, strict, "1", 1)
        token = await log_in(client, await make_user(strict, "owner", tenant_id))
        for _ in range(2):
            wrong = await client.post("/console/redeem", data={"code": "TG-X", "_csrf": token})
            assert wrong.status_code == 404
        limited = await client.post("/console/redeem", data={"code": codes[0], "_csrf": token})
        assert limited.status_code == 429
        assert "Too many redemption attempts" in limited.text
        assert balance_on(limited.text) == "1000"


async def test_an_operator_suspends_resumes_and_deletes_a_tenant(
    client: Client, settings: Settings
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    operator_token = await log_in(client, await make_user(settings, "operator"))
    path = f"/console/operator/tenants/{tenant_id}"
    async with await new_client(settings) as tenant:
        owner_token = await log_in(tenant, await make_user(settings, "owner", tenant_id))
        form = {"model": "krea-2-turbo", "prompt": "a cat", "_csrf": owner_token}
        first = await tenant.post("/console/playground", data=form, follow_redirects=False)
        assert first.status_code == 303
        # Neither the tenant's owner nor a CSRF-less post may suspend.
        mine = await tenant.post(f"{path}/state", data={"action": "suspend", "_csrf": owner_token})
        assert mine.status_code == 403
        assert (await client.post(f"{path}/state", data={"action": "suspend"})).status_code == 403

        suspended = await client.post(
            f"{path}/state", data={"action": "suspend", "_csrf": operator_token}
        )
        assert suspended.status_code == 200
        assert "State: <strong>suspended</strong>" in suspended.text
        assert "Resume tenant" in suspended.text
        refused = await tenant.post("/console/playground", data=form)
        assert refused.status_code == 403
        assert refused.headers["content-type"].startswith("text/html"), refused.headers
        assert "tenant_suspended" in refused.text
        assert 'id="suspended"' in (await tenant.get("/console/overview")).text
        # Reads go on.
        assert (await tenant.get("/console/tasks")).status_code == 200

        resumed = await client.post(
            f"{path}/state", data={"action": "resume", "_csrf": operator_token}
        )
        assert "State: <strong>active</strong>" in resumed.text
        again = await tenant.post("/console/playground", data=form, follow_redirects=False)
        assert again.status_code == 303

        # Deleting needs the tenant's name typed.
        unconfirmed = await client.post(
            f"{path}/delete", data={"confirm": "not it", "_csrf": operator_token}
        )
        assert "type the tenant's name" in unconfirmed.text
        assert "State: <strong>active</strong>" in unconfirmed.text
        name = re.search(r"<h1>Tenant (.+?) <small>", unconfirmed.text)
        assert name
        deleted = await client.post(
            f"{path}/delete", data={"confirm": name.group(1), "_csrf": operator_token}
        )
        assert "State: <strong>deleted</strong>" in deleted.text
        gone = await tenant.post("/console/playground", data=form)
        assert gone.status_code == 403
        assert "tenant_suspended" in gone.text
        api = await client.get("/v1/account", headers=bearer(key))
        assert api.status_code == 401  # every key revoked


async def test_keys_take_an_expiry_and_the_key_management_scope(
    client: Client, settings: Settings
) -> None:
    tenant_id, _ = await make_tenant_key(settings)
    token = await log_in(client, await make_user(settings, "owner", tenant_id))
    ends = (datetime.now(UTC) + timedelta(days=30)).replace(second=0, microsecond=0)
    made = await client.post(
        "/console/keys",
        data={
            "name": "expiring",
            "expires_at": ends.strftime("%Y-%m-%dT%H:%M"),
            "can_manage_keys": "on",
            "_csrf": token,
        },
    )
    assert made.status_code == 200, made.text
    assert ends.strftime("%Y-%m-%d %H:%M UTC") in made.text
    secret = re.search(r'id="new-key">([^<]+)<', made.text)
    assert secret
    account = (await client.get("/v1/account", headers=bearer(secret.group(1)))).json()
    assert account["key"]["expires_at"] == ends.isoformat()
    assert account["key"]["can_manage_keys"] is True
    plain = await client.post("/console/keys", data={"name": "plain", "_csrf": token})
    plain_secret = re.search(r'id="new-key">([^<]+)<', plain.text)
    assert plain_secret
    listing = await client.get("/v1/keys", headers=bearer(plain_secret.group(1)))
    assert listing.status_code == 403  # made without the scope
    past = await client.post(
        "/console/keys", data={"expires_at": "2001-01-01T00:00", "_csrf": token}
    )
    assert "expires_at: must be in the future" in past.text
    bad = await client.post("/console/keys", data={"expires_at": "soon", "_csrf": token})
    assert "expires_at: must be a date and time" in bad.text


async def test_the_playground_key_never_expires_and_survives_a_revocation(
    client: Client, settings: Settings
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    token = await log_in(client, await make_user(settings, "owner", tenant_id))
    form = {"model": "krea-2-turbo", "prompt": "a cat", "_csrf": token}
    assert (await client.post("/console/playground", data=form)).status_code == 200
    found = (await client.get("/v1/keys", headers=bearer(key))).json()["data"]
    console = [k for k in found if k["name"] == "console"]
    assert len(console) == 1
    assert console[0]["expires_at"] is None
    assert console[0]["can_manage_keys"] is False
    assert console[0]["id"] not in (await client.get("/console/keys")).text  # hidden
    # Revoked through the API (the tenant sees it there): the playground issues another.
    revoked = await client.post(f"/v1/keys/{console[0]['id']}/revoke", headers=bearer(key))
    assert revoked.status_code == 200
    again = await client.post("/console/playground", data=form, follow_redirects=False)
    assert again.status_code == 303
    found = (await client.get("/v1/keys", headers=bearer(key))).json()["data"]
    live = [k for k in found if k["name"] == "console" and k["revoked_at"] is None]
    assert len(live) == 1
    assert live[0]["expires_at"] is None


async def test_an_operator_manages_groups_prices_and_rates(
    client: Client, settings: Settings
) -> None:
    operator = await make_user(settings, "operator")
    token = await log_in(client, operator)
    group = f"console-{datetime.now(UTC).strftime('%H%M%S%f')}"
    made = await client.post(
        "/console/operator/prices/groups",
        data={"name": group, "multiplier": "2", "description": "twice", "_csrf": token},
    )
    assert made.status_code == 200, made.text
    assert f"Group {group} created." in made.text
    bad = await client.post(
        "/console/operator/prices/groups",
        data={"name": group + "-x", "multiplier": "-1", "_csrf": token},
    )
    assert bad.status_code == 400
    assert "multiplier: " in bad.text
    edited = await client.post(
        f"/console/operator/prices/groups/{group}",
        data={"multiplier": "3", "description": "thrice", "_csrf": token},
    )
    assert edited.status_code == 200
    page = await client.get(f"/console/operator/prices/groups/{group}")
    assert page.status_code == 200
    row = re.search(r'<tr id="price-krea-2-turbo">.*?</tr>', page.text, re.S)
    assert row
    assert "0.018 per_call" in row.group(0) or "0.018 per_image" in row.group(0)
    assert 'class="source">group_multiplier<' in row.group(0)
    price = f"/console/operator/prices/groups/{group}/models/krea-2-turbo"
    assert (await client.post(price, data={"rule": "per_call", "amount": "0.5"})).status_code == 403
    set_ = await client.post(price, data={"rule": "per_call", "amount": "0.5", "_csrf": token})
    assert set_.status_code == 200, set_.text
    row = re.search(r'<tr id="price-krea-2-turbo">.*?</tr>', set_.text, re.S)
    assert row
    assert "0.5 per_call" in row.group(0)
    assert "/reset" in row.group(0)
    wrong = await client.post(price, data={"rule": "per_image", "amount": "x", "_csrf": token})
    assert wrong.status_code == 400
    assert "amount:" in wrong.text

    # A tenant of the group sees the new price in its playground.
    tenant_id, _ = await make_tenant_key(settings, group=group)
    async with await new_client(settings) as tenant:
        tenant_token = await log_in(tenant, await make_user(settings, "owner", tenant_id))
        quoted = await tenant.post(
            "/console/playground/price",
            data={"model": "krea-2-turbo", "prompt": "x", "_csrf": tenant_token},
        )
        assert quoted.text.strip() == "0.5 credits"
        # The price pages are the operator's.
        for path in ("/console/operator/prices", f"/console/operator/prices/groups/{group}"):
            assert (await tenant.get(path)).status_code == 403
        assert (
            await tenant.post(
                price, data={"rule": "per_image", "amount": "0", "_csrf": tenant_token}
            )
        ).status_code == 403

    reset = await client.post(f"{price}/reset", data={"_csrf": token})
    row = re.search(r'<tr id="price-krea-2-turbo">.*?</tr>', reset.text, re.S)
    assert row
    assert 'class="source">group_multiplier<' in row.group(0)
    changes = (await client.get("/console/operator/prices")).text
    assert f"console:{operator.email}" in changes
    assert f"{group}/krea-2-turbo" in changes
    assert "thrice" in changes

    rates = await client.post(
        "/console/operator/rates",
        data={"currency": "cny", "rate": "0.15", "note": "from the console", "_csrf": token},
    )
    assert rates.status_code == 200, rates.text
    assert "Rate for CNY set." in rates.text
    assert "<td>CNY</td><td>0.15</td><td>operator</td>" in rates.text
    assert "from the console" in rates.text
    # Back to the catalogue's figure: the database is shared with the tests after this one.
    catalogue_cny = str(load_catalog().exchange_rates["CNY"])
    restored = await client.post(
        "/console/operator/rates", data={"currency": "CNY", "rate": catalogue_cny, "_csrf": token}
    )
    assert restored.status_code == 200, restored.text
    refused = await client.post(
        "/console/operator/rates", data={"currency": "C", "rate": "1", "_csrf": token}
    )
    assert refused.status_code == 400
    assert "currency:" in refused.text
    assert (
        await client.post("/console/operator/rates", data={"currency": "EUR"})
    ).status_code == 403
