"""Prices at run time: groups, group prices, exchange rates, the change record, the
caller's prices in GET /v1/models, a price change racing submits, a channel's own cost
recorded on its task, and the per-task margin export with a refund.

The race runs the app under uvicorn and fires real parallel requests with httpx; tasks
are finished by playing the worker's part with ``gateway.tasks.lifecycle`` except in
the channel test, which runs a real worker against the simulator.
"""

import asyncio
import csv
import io
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from conftest import SIM_KEY, assert_error, bearer, make_tenant_key, run_cli, scalar, serve_app
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.ledger import reports
from gateway.ledger import service as ledger
from gateway.prices.book import build_snapshot
from gateway.settings import Settings
from gateway.tasks import lifecycle
from pricing.catalog import CatalogError, load_catalog

Client = AsyncTestClient[Any]
GENERATIONS = "/v1/images/generations"


def admin(settings: Settings, actor: str = "") -> dict[str, str]:
    headers = bearer(settings.admin_token)
    if actor:
        headers["X-Tollgate-Actor"] = actor
    return headers


def exact(response: httpx.Response) -> Any:
    """The JSON body with numbers read as exact decimals (as the API writes them)."""
    return json.loads(response.text, parse_float=Decimal)


def group_name() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


async def new_group(client: Client, settings: Settings, multiplier: str = "1") -> str:
    name = group_name()
    made = await client.post(
        "/admin/groups",
        json={"name": name, "multiplier": multiplier, "description": "test group"},
        headers=admin(settings, "alice"),
    )
    assert made.status_code == 201, made.text
    return name


async def finish(engine: AsyncEngine, task_id: str, images: int = 1) -> None:
    async with engine.begin() as conn:
        assert await lifecycle.claim(conn, task_id, 0, 30) is not None
        keys = [f"{task_id}/{i}.png" for i in range(images)]
        assert await lifecycle.complete(conn, task_id, 0, keys, 3600)


async def ledger_problems(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return await ledger.check(conn)


# ---------------------------------------------------------------- groups and prices


async def test_groups_are_created_listed_and_changed_with_a_record(
    client: Client, settings: Settings
) -> None:
    name = await new_group(client, settings, "0.8")
    listed = (await client.get("/admin/groups", headers=admin(settings))).json()["data"]
    mine = next(g for g in listed if g["name"] == name)
    assert mine == {
        "name": name,
        "multiplier": "0.8",
        "description": "test group",
        "own_prices": [],
        "in_catalogue": False,
    }
    assert any(g["name"] == "default" and g["in_catalogue"] for g in listed)

    changed = await client.patch(
        f"/admin/groups/{name}", json={"multiplier": 1.25}, headers=admin(settings, "bob")
    )
    assert changed.status_code == 200, changed.text
    assert changed.json() == {"name": name, "multiplier": "1.25", "description": "test group"}

    changes = (await client.get("/admin/price-changes", headers=admin(settings))).json()["data"]
    mine_changes = [c for c in changes if c["subject"] == name]
    assert [(c["actor"], c["old"], c["new"]) for c in mine_changes] == [
        (
            "bob",
            {"multiplier": "0.8", "description": "test group"},
            {"multiplier": "1.25", "description": "test group"},
        ),
        ("alice", None, {"multiplier": "0.8", "description": "test group"}),
    ]
    assert all(c["changed_at"] for c in mine_changes)


async def test_a_patch_that_changes_nothing_is_not_recorded(
    client: Client, settings: Settings
) -> None:
    name = await new_group(client, settings, "0.8")
    for body in ({}, {"multiplier": "0.80"}, {"description": "test group"}):
        same = await client.patch(f"/admin/groups/{name}", json=body, headers=admin(settings))
        assert same.status_code == 200, same.text
        assert same.json() == {"name": name, "multiplier": "0.8", "description": "test group"}
    changes = (await client.get("/admin/price-changes", headers=admin(settings))).json()["data"]
    assert [c["old"] for c in changes if c["subject"] == name] == [None]


async def test_figures_in_exponent_form_are_stored_and_shown_as_plain_decimals(
    client: Client, settings: Settings
) -> None:
    name = await new_group(client, settings)
    changed = await client.patch(
        f"/admin/groups/{name}",
        content=b'{"multiplier": "1E+2"}',
        headers={**admin(settings), "Content-Type": "application/json"},
    )
    assert changed.json()["multiplier"] == "100"
    as_number = await client.patch(
        f"/admin/groups/{name}",
        content=b'{"multiplier": 2e2}',
        headers={**admin(settings), "Content-Type": "application/json"},
    )
    assert "E" not in as_number.json()["multiplier"].upper()
    assert Decimal(as_number.json()["multiplier"]) == 200
    price = await client.put(
        f"/admin/groups/{name}/prices/krea-1", json={"amount": "5E-2"}, headers=admin(settings)
    )
    assert price.json()["amount"] == "0.05"
    rate = await client.put(
        "/admin/exchange-rates/KCU", json={"rate": "2E-3"}, headers=admin(settings)
    )
    assert rate.json()["rate"] == "0.002"
    rows = (await client.get(f"/admin/groups/{name}/prices", headers=admin(settings))).json()
    figures = [
        json.dumps([row["amount"], row["catalogue_price"], row.get("by_quality")])
        for row in rows["data"]
    ]
    assert not [f for f in figures if re.search(r"\d[eE][-+]?\d", f)], figures


async def test_bad_group_input_is_a_400_naming_the_field(
    client: Client, settings: Settings
) -> None:
    name = await new_group(client, settings)
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/admin/groups", {"name": "has space"}, "name"),
        ("POST", "/admin/groups", {"name": name}, "name"),
        ("POST", "/admin/groups", {"name": group_name(), "multiplier": "-1"}, "multiplier"),
        ("POST", "/admin/groups", {"name": group_name(), "multiplier": "0"}, "multiplier"),
        ("PATCH", f"/admin/groups/{name}", {"multiplier": "abc"}, "multiplier"),
        ("PUT", f"/admin/groups/{name}/prices/flux-1-pro", {"amount": "-0.1"}, "amount"),
        (
            "PUT",
            f"/admin/groups/{name}/prices/krea-1",
            {"amount": "1", "by_quality": {"8K": "2"}},
            "by_quality",
        ),
        (
            "PUT",
            f"/admin/groups/{name}/prices/krea-1",
            {"amount": "1", "rule": "per_megapixel_step"},
            "rule",
        ),
        ("PUT", "/admin/exchange-rates/cny", {"rate": "0.14"}, "currency"),
        ("PUT", "/admin/exchange-rates/USD", {"rate": "2"}, "currency"),
        ("PUT", "/admin/exchange-rates/CNY", {"rate": "0"}, "rate"),
    ]
    for method, path, body, field in cases:
        response = await client.request(method, path, json=body, headers=admin(settings))
        assert_error(response, 400, "invalid_request", field)
    missing = await client.put(
        "/admin/groups/no-such-group/prices/flux-1-pro",
        json={"amount": "1"},
        headers=admin(settings),
    )
    assert missing.status_code == 404
    unknown_model = await client.put(
        f"/admin/groups/{name}/prices/no-such-model", json={"amount": "1"}, headers=admin(settings)
    )
    assert unknown_model.status_code == 404


async def test_group_prices_say_where_each_price_comes_from(
    client: Client, settings: Settings
) -> None:
    name = await new_group(client, settings, "2")
    put = await client.put(
        f"/admin/groups/{name}/prices/flux-1-pro",
        json={"amount": "0.37"},
        headers=admin(settings, "carol"),
    )
    assert put.status_code == 200, put.text
    assert put.json() == {
        "group": name,
        "model": "flux-1-pro",
        "rule": "per_image",
        "amount": "0.37",
    }

    rows = (await client.get(f"/admin/groups/{name}/prices", headers=admin(settings))).json()
    by_model = {row["model"]: row for row in rows["data"]}
    assert by_model["flux-1-pro"]["source"] == "group_override"
    assert by_model["flux-1-pro"]["amount"] == "0.37"
    assert by_model["flux-1-pro"]["currency"] == "USD"
    # The others: the catalogue's price × 2, exact.
    assert by_model["krea-2-medium"]["source"] == "group_multiplier"
    assert by_model["krea-2-medium"]["amount"] == "0.09"  # 0.045 × 2, no trailing zero
    assert by_model["krea-2-medium"]["with_moodboard"] == "0.12"
    assert by_model["krea-2-medium"]["catalogue_price"]["amount"] == "0.045"
    default = (await client.get("/admin/groups/default/prices", headers=admin(settings))).json()
    assert {row["source"] for row in default["data"]} == {"catalogue"}

    gone = await client.delete(f"/admin/groups/{name}/prices/flux-1-pro", headers=admin(settings))
    assert gone.status_code == 204
    rows = (await client.get(f"/admin/groups/{name}/prices", headers=admin(settings))).json()
    flux = next(row for row in rows["data"] if row["model"] == "flux-1-pro")
    assert (flux["source"], flux["amount"]) == ("group_multiplier", "0.1554")
    again = await client.delete(f"/admin/groups/{name}/prices/flux-1-pro", headers=admin(settings))
    assert again.status_code == 404
    changes = (await client.get("/admin/price-changes", headers=admin(settings))).json()["data"]
    record = [c for c in changes if c["subject"] == f"{name}/flux-1-pro"]
    assert [(c["old"], c["new"]) for c in record] == [
        ({"rule": "per_image", "amount": "0.37"}, None),
        (None, {"rule": "per_image", "amount": "0.37"}),
    ]


async def test_seed_figures_set_as_a_groups_prices_are_the_seeds_examples_exactly(
    client: Client, settings: Settings
) -> None:
    name = await new_group(client, settings)
    for model, amount in (("stable-diffusion-3-5-large-turbo", "0.0032"), ("flux-1-pro", 0.37)):
        put = await client.put(
            f"/admin/groups/{name}/prices/{model}", json={"amount": amount}, headers=admin(settings)
        )
        assert put.status_code == 200, put.text
    _, key = await make_tenant_key(settings, group=name)
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.1)
    turbo = await client.post(
        GENERATIONS,
        json={"model": "stable-diffusion-3-5-large-turbo", "prompt": "p", "size": "1024x512"},
        headers=bearer(key),
    )
    assert turbo.status_code == 200, turbo.text
    assert exact(turbo)["usage"]["credits_reserved"] == Decimal("0.0064")
    assert turbo.json()["usage"]["user_group"] == name
    pro = await client.post(
        GENERATIONS,
        json={"model": "flux-1-pro", "prompt": "p", "size": "1024x512"},
        headers=bearer(key),
    )
    assert exact(pro)["usage"]["credits_reserved"] == Decimal("0.37")


# ---------------------------------------------------------------- GET /v1/models


async def test_models_show_the_callers_group_price_and_follow_a_change(
    client: Client, settings: Settings
) -> None:
    name = await new_group(client, settings, "3")
    _, key = await make_tenant_key(settings, group=name)
    _, default_key = await make_tenant_key(settings)

    async def price_of(model: str, with_key: str) -> dict[str, Any]:
        listed = exact(await client.get("/v1/models", headers=bearer(with_key)))["data"]
        found: dict[str, Any] = next(m for m in listed if m["id"] == model)["price"]
        return found

    assert await price_of("krea-2-turbo", default_key) == {
        "rule": "per_call",
        "amount": Decimal("0.006"),
        "currency": "USD",
        "user_group": "default",
        "by_quality": {"2K": Decimal("0.012")},
    }
    assert await price_of("krea-2-medium", key) == {
        "rule": "per_call",
        "amount": Decimal("0.135"),
        "currency": "USD",
        "user_group": name,
        "with_style_references": Decimal("0.1575"),
        "with_moodboard": Decimal("0.18"),
    }
    put = await client.put(
        f"/admin/groups/{name}/prices/krea-2-medium",
        json={"amount": "0.05", "with_moodboard": "0.07"},
        headers=admin(settings),
    )
    assert put.status_code == 200
    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.1)
    assert await price_of("krea-2-medium", key) == {
        "rule": "per_call",
        "amount": Decimal("0.05"),
        "currency": "USD",
        "user_group": name,
        "with_moodboard": Decimal("0.07"),
    }
    assert (await price_of("krea-2-medium", default_key))["amount"] == Decimal("0.045")


# ---------------------------------------------------------------- exchange rates


async def test_exchange_rates_are_dated_kept_and_used_for_new_quotes(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    shown = (await client.get("/admin/exchange-rates", headers=admin(settings))).json()
    assert shown["credit_currency"] == "USD"
    rates = {r["currency"]: r["rate"] for r in shown["rates"]}
    assert rates["USD"] == "1"
    _, key = await make_tenant_key(settings)
    body = {"model": "flux-1-pro", "prompt": "p"}
    before = await client.post(GENERATIONS, json=body, headers=bearer(key))
    before_quote = await scalar(
        engine, "SELECT quote FROM tasks WHERE id = :id", id=before.json()["id"]
    )
    # Future-dated: not in force yet; then one in force now.
    future = await client.put(
        "/admin/exchange-rates/CNY",
        json={"rate": "0.5", "effective_at": "2999-01-01T00:00:00Z", "note": "later"},
        headers=admin(settings, "treasurer"),
    )
    assert future.status_code == 200, future.text
    # A rate unlike the one in force (another test may have left 0.15 there).
    new_rate = "0.16" if rates["CNY"] == "0.15" else "0.15"
    now = await client.put(
        "/admin/exchange-rates/CNY", json={"rate": new_rate}, headers=admin(settings, "treasurer")
    )
    assert now.status_code == 200, now.text
    shown = (await client.get("/admin/exchange-rates", headers=admin(settings))).json()
    cny = next(r for r in shown["rates"] if r["currency"] == "CNY")
    assert (cny["rate"], cny["source"]) == (new_rate, "operator")
    history = [h for h in shown["history"] if h["currency"] == "CNY"]
    assert [h["rate"] for h in history][:2] == ["0.5", new_rate]
    assert all(h["set_by"] == "treasurer" for h in history[:2])

    await asyncio.sleep(settings.key_cache_ttl_seconds + 0.1)
    after = await client.post(GENERATIONS, json=body, headers=bearer(key))
    after_quote = await scalar(
        engine, "SELECT quote FROM tasks WHERE id = :id", id=after.json()["id"]
    )
    assert before_quote["rates"]["CNY"] != new_rate
    assert after_quote["rates"]["CNY"] == new_rate
    assert after_quote["exact_cost_native"] == "0.37"
    assert after_quote["cost_micros"] == {"0.15": 55_500, "0.16": 59_200}[new_rate]  # ¥0.37 × rate
    # The sale price does not move with the rate: it is the group's price.
    assert after_quote["amount_micros"] == before_quote["amount_micros"]
    # Back to the catalogue's figure for the tests after this one (the database is shared).
    back = await client.put(
        "/admin/exchange-rates/CNY", json={"rate": rates["CNY"]}, headers=admin(settings)
    )
    assert back.status_code == 200


# ---------------------------------------------------------------- a change racing submits


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    """Prices re-read every 20 ms, so a change lands in the middle of the burst."""
    return settings.model_copy(update={"key_cache_ttl_seconds": 0.02})


@pytest.fixture
async def base_url(fast_settings: Settings) -> AsyncIterator[str]:
    async with serve_app(fast_settings) as url:
        yield url


@pytest.mark.timeout(300)
async def test_a_price_change_racing_200_submits_holds_each_task_at_its_quote(
    fast_settings: Settings, base_url: str, engine: AsyncEngine
) -> None:
    settings = fast_settings
    old, new = 370_000, 500_000
    async with httpx.AsyncClient(
        base_url=base_url,
        trust_env=False,
        timeout=120,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    ) as http:
        name = group_name()
        made = await http.post(
            "/admin/groups", json={"name": name}, headers=admin(settings, "racer")
        )
        assert made.status_code == 201
        path = f"/admin/groups/{name}/prices/flux-1-pro"
        assert (await http.put(path, json={"amount": "0.37"}, headers=admin(settings))).is_success
        tenant_id, key = await make_tenant_key(settings, group=name)
        await asyncio.sleep(settings.key_cache_ttl_seconds + 0.1)

        async def one(i: int) -> httpx.Response:
            return await http.post(
                GENERATIONS,
                json={"model": "flux-1-pro", "prompt": f"race {i}"},
                headers=bearer(key),
            )

        async def change() -> httpx.Response:
            await asyncio.sleep(0.05)
            return await http.put(path, json={"amount": "0.5"}, headers=admin(settings, "racer"))

        *responses, changed = await asyncio.gather(*(one(i) for i in range(200)), change())
        assert changed.status_code == 200
        assert Counter(r.status_code for r in responses) == {200: 200}
        # Within the TTL, every process sells at the new price.
        await asyncio.sleep(settings.key_cache_ttl_seconds + 0.1)
        later = await one(200)
        assert exact(later)["usage"]["credits_reserved"] == Decimal("0.5")

    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT t.id, t.credits_reserved_micros, (t.quote ->> 'amount_micros')::bigint,"
                    " h.amount_micros FROM tasks t JOIN ledger_entries h"
                    " ON h.task_id = t.id AND h.kind = 'hold' WHERE t.tenant_id = :t"
                ),
                {"t": tenant_id},
            )
        ).all()
    assert len(rows) == 201
    assert {reserved for _, reserved, _, _ in rows} == {old, new}
    for _, reserved, quoted, hold in rows:
        assert reserved == quoted == hold
    # Each settles at the price it was held at, though the price has changed since.
    for task_id, *_ in rows:
        await finish(engine, task_id)
    async with engine.connect() as conn:
        settled = (
            await conn.execute(
                text(
                    "SELECT credits_reserved_micros, credits_charged_micros FROM tasks"
                    " WHERE tenant_id = :t"
                ),
                {"t": tenant_id},
            )
        ).all()
    assert all(reserved == charged for reserved, charged in settled)
    assert await ledger_problems(engine) == []


# ---------------------------------------------------------------- a channel's own cost


@pytest.fixture
async def priced_channel(
    client: Client, settings: Settings, simulator_url: str
) -> AsyncIterator[str]:
    """A channel serving flux-1-pro first, at its own cost in USD; removed afterwards."""
    made = await client.post(
        "/admin/channels",
        json={
            "name": f"tp-{uuid.uuid4().hex[:8]}",
            "adapter": "siliconflow",
            "base_url": simulator_url,
            "api_key": SIM_KEY,
            "models": {"flux-1-pro": None},
            "priority": 1000,
            "upstream_costs": {
                "flux-1-pro": {"currency": "USD", "rule": "per_image", "amount": "0.05"}
            },
        },
        headers=admin(settings),
    )
    assert made.status_code == 201, made.text
    assert made.json()["upstream_costs"] == {
        "flux-1-pro": {"currency": "USD", "rule": "per_image", "amount": "0.05"}
    }
    yield made.json()["id"]
    await client.delete(f"/admin/channels/{made.json()['id']}", headers=admin(settings))


async def test_a_channels_own_cost_is_recorded_on_the_task_it_makes(
    client: Client, settings: Settings, engine: AsyncEngine, priced_channel: str, worker: None
) -> None:
    bad = await client.patch(
        f"/admin/channels/{priced_channel}",
        json={
            "upstream_costs": {
                "flux-1-pro": {"currency": "usd", "rule": "per_image", "amount": "1"}
            }
        },
        headers=admin(settings),
    )
    assert bad.status_code == 400
    await asyncio.sleep(settings.channel_cache_ttl_seconds + 0.1)
    _, key = await make_tenant_key(settings)
    made = await client.post(
        GENERATIONS, json={"model": "flux-1-pro", "prompt": "p", "n": 2}, headers=bearer(key)
    )
    assert made.status_code == 200, made.text
    task_id = made.json()["id"]
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        status = await scalar(engine, "SELECT status FROM tasks WHERE id = :id", id=task_id)
        if status in ("completed", "failed") or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert status == "completed"
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT channel_id, upstream_cost_amount, upstream_cost_currency,"
                    " upstream_cost_micros, credits_charged_micros FROM tasks WHERE id = :id"
                ),
                {"id": task_id},
            )
        ).one()
    # Two images at $0.05 on this channel, not the catalogue's ¥0.37 each.
    assert tuple(row) == (priced_channel, "0.1", "USD", 100_000, 2 * 77_700)


# ---------------------------------------------------------------- margin export


async def test_the_margin_export_and_the_usage_report_count_a_refund(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    made = await client.post(
        GENERATIONS, json={"model": "flux-1-pro", "prompt": "p", "n": 2}, headers=bearer(key)
    )
    task_id = made.json()["id"]
    await finish(engine, task_id, images=2)
    rate = Decimal(
        await scalar(
            engine, "SELECT quote -> 'rates' ->> 'CNY' FROM tasks WHERE id = :id", id=task_id
        )
    )
    cost = int(Decimal("0.74") * rate * 1_000_000)  # whole micro-credits at 0.14 or 0.15
    refund = await client.post(
        f"/admin/tasks/{task_id}/refund",
        json={"amount": "0.03", "reason": "one image was blurry"},
        headers=admin(settings),
    )
    assert refund.status_code == 200, refund.text

    export = await client.get("/admin/usage/tasks", headers=admin(settings))
    assert export.status_code == 200, export.text
    row = next(r for r in exact(export)["data"] if r["task_id"] == task_id)
    # Charged 2 × 0.0777; cost 2 × ¥0.37 at the quoted rate (0.14: 0.1036); refunded 0.03.
    assert row["tenant_id"] == tenant_id
    assert row["quoted_micros"] == 155_400
    assert row["charged_micros"] == 155_400
    assert row["refunded_micros"] == 30_000
    assert row["adjusted_micros"] == 0
    assert row["net_micros"] == 125_400
    assert row["upstream_cost_micros"] == cost
    assert (row["upstream_cost_amount"], row["upstream_cost_currency"]) == ("0.74", "CNY")
    assert row["margin_micros"] == 125_400 - cost
    assert row["margin"] == Decimal(125_400 - cost) / 1_000_000

    as_csv = await client.get("/admin/usage/tasks?format=csv", headers=admin(settings))
    assert as_csv.headers["content-type"].startswith("text/csv")
    parsed = {r["task_id"]: r for r in csv.DictReader(io.StringIO(as_csv.text))}
    assert Decimal(parsed[task_id]["margin"]) == row["margin"]
    assert parsed[task_id]["refunded"] == "0.03"
    assert parsed[task_id]["upstream_cost_currency"] == "CNY"

    outside = await client.get(
        "/admin/usage/tasks?from=2000-01-01&to=2000-01-02", headers=admin(settings)
    )
    assert outside.json()["data"] == []
    backwards = await client.get(
        "/admin/usage/tasks?from=2000-01-02&to=2000-01-01", headers=admin(settings)
    )
    assert_error(backwards, 400, "invalid_request", "from")
    not_a_day = await client.get("/admin/usage/tasks?from=2026-13-01", headers=admin(settings))
    assert assert_error(not_a_day, 400, "invalid_request")["message"].startswith("from: ")

    report = await client.get(f"/admin/tenants/{tenant_id}/usage", headers=admin(settings))
    day = report.json()["data"][0]
    assert day["charged_micros"] == 155_400
    assert day["refunded_micros"] == 30_000
    assert day["margin_micros"] == 125_400 - cost


async def test_an_adjustment_naming_a_task_is_counted_as_adjusted(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    made = await client.post(
        GENERATIONS, json={"model": "flux-1-pro", "prompt": "p"}, headers=bearer(key)
    )
    task_id = made.json()["id"]
    await finish(engine, task_id)
    goodwill = await client.post(
        f"/admin/tenants/{tenant_id}/adjust",
        json={"amount": "0.01", "reason": "late", "task_id": task_id},
        headers=admin(settings),
    )
    assert goodwill.status_code == 200, goodwill.text
    code, _, err = await run_cli(
        settings, "credits", "adjust", tenant_id, "0.002", "--reason", "x", "--task", task_id
    )
    assert code == 0, err

    export = await client.get("/admin/usage/tasks", headers=admin(settings))
    row = next(r for r in exact(export)["data"] if r["task_id"] == task_id)
    assert (row["charged_micros"], row["adjusted_micros"]) == (77_700, 12_000)
    assert row["net_micros"] == 65_700
    report = await client.get(f"/admin/tenants/{tenant_id}/usage", headers=admin(settings))
    assert report.json()["data"][0]["adjusted_micros"] == 12_000

    other_tenant, _ = await make_tenant_key(settings)
    for path, body in [
        (
            f"/admin/tenants/{other_tenant}/adjust",
            {"amount": "1", "reason": "r", "task_id": task_id},
        ),
        (f"/admin/tenants/{tenant_id}/adjust", {"amount": "1", "reason": "r", "task_id": "nope"}),
        (f"/admin/tenants/{tenant_id}/topup", {"amount": "1", "task_id": task_id}),
    ]:
        refused = await client.post(path, json=body, headers=admin(settings))
        assert_error(refused, 400, "invalid_request", "task_id")
    assert await ledger_problems(engine) == []


async def test_an_export_over_its_cap_is_refused_not_cut_short(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key = await make_tenant_key(settings)
    for _ in range(2):
        made = await client.post(
            GENERATIONS, json={"model": "krea-1", "prompt": "p"}, headers=bearer(key)
        )
        assert made.status_code < 300, made.text
    today = datetime.now(UTC).date().isoformat()
    monkeypatch.setattr(reports, "MAX_EXPORT_ROWS", 1)
    over = await client.get(f"/admin/usage/tasks?from={today}", headers=admin(settings))
    assert assert_error(over, 400, "invalid_request")["message"].startswith("from: ")
    code, _, err = await run_cli(
        settings, "usage-export", "--from", "2026-12-31", "--to", "2026-12-01"
    )
    assert (code, "from: must not be after `to`" in err) == (1, True), err


# ---------------------------------------------------------------- the CLI


async def test_the_cli_changes_groups_prices_and_rates_with_a_record(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    name = group_name()
    code, out, err = await run_cli(
        settings, "groups", "create", name, "--multiplier", "0.9", "--actor", "ops"
    )
    assert code == 0, err
    assert json.loads(out)["multiplier"] == "0.9"
    code, out, err = await run_cli(
        settings, "groups", "set-price", name, "krea-2-turbo", "0.01", "--quality", "2K=0.02"
    )
    assert code == 0, err
    assert json.loads(out)["by_quality"] == {"2K": "0.02"}
    code, out, err = await run_cli(settings, "groups", "prices", name)
    rows = {row["model"]: row for row in json.loads(out)}
    assert (rows["krea-2-turbo"]["source"], rows["krea-2-turbo"]["amount"]) == (
        "group_override",
        "0.01",
    )
    assert rows["krea-1"]["source"] == "group_multiplier"
    code, out, err = await run_cli(settings, "groups", "reset-price", name, "krea-2-turbo")
    assert code == 0, err
    code, _, err = await run_cli(settings, "groups", "set", name, "--multiplier", "nope")
    assert code == 1
    assert "multiplier" in err
    code, out, err = await run_cli(settings, "rates", "set", "KCU", "0.002", "--note", "plan")
    assert code == 0, err
    code, out, err = await run_cli(settings, "rates", "list")
    assert any(h["note"] == "plan" for h in json.loads(out)["history"])
    code, out, err = await run_cli(settings, "price-changes", "--limit", "10")
    mine = [c for c in json.loads(out) if c["subject"].startswith(name)]
    assert [c["kind"] for c in mine] == ["group_price", "group_price", "group"]
    assert mine[-1]["actor"] == "ops"
    assert mine[0]["actor"].startswith("cli")
    # The API sees what the CLI set.
    listed = (await client.get("/admin/groups", headers=admin(settings))).json()["data"]
    assert any(g["name"] == name and g["multiplier"] == "0.9" for g in listed)
    code, out, err = await run_cli(settings, "usage-export", "--csv")
    assert code == 0, err
    assert out.splitlines()[0].startswith("task_id,tenant_id,model")


def test_the_rate_in_force_is_the_latest_whose_date_has_come() -> None:
    catalog = load_catalog()
    day = timedelta(days=1)
    now = datetime.now(UTC)
    rows = [
        ("CNY", "0.13", now - 3 * day),
        ("CNY", "0.15", now - day),
        ("CNY", "0.2", now + day),
        ("KCU", "0.0019", now - day),
    ]
    book = build_snapshot(catalog, 1, [], [], rows)
    assert len(book.rate_history["CNY"]) == 2  # the superseded 0.13 is not scanned
    assert book.rates_at(now) == {
        "USD": Decimal(1),
        "CNY": Decimal("0.15"),
        "KCU": Decimal("0.0019"),
    }
    assert book.rates_at(now + 2 * day)["CNY"] == Decimal("0.2")
    # Before any operator's rate: the catalogue's default.
    assert build_snapshot(catalog, 1, [], [], []).rates_at(now)["CNY"] == Decimal("0.14")


async def test_the_cli_sets_a_channels_own_upstream_cost(settings: Settings) -> None:
    name = f"tp-{uuid.uuid4().hex[:8]}"
    code, out, err = await run_cli(
        settings,
        "channels",
        "add",
        name,
        "--adapter",
        "siliconflow",
        "--base-url",
        "http://127.0.0.1:9",
        "--models",
        "flux-1-pro",
        "--api-key-env",
        "TP_KEY",
        "--upstream-cost",
        "flux-1-pro=CNY:per_image:0.30",
        TP_KEY="sk-test",
    )
    assert code == 0, err
    assert json.loads(out)["upstream_costs"] == {
        "flux-1-pro": {"currency": "CNY", "rule": "per_image", "amount": "0.30"}
    }
    code, _, err = await run_cli(
        settings, "channels", "update", name, "--upstream-cost", "flux-1-pro=cny:per_image:1"
    )
    assert code == 2
    assert "--upstream-cost" in err
    code, _, err = await run_cli(settings, "channels", "update", name, "--upstream-cost", "nope")
    assert code == 2
    assert (await run_cli(settings, "channels", "remove", name))[0] == 0


def test_a_catalogue_in_another_currency_than_the_credits_stops_the_gateway(
    settings: Settings,
) -> None:
    with pytest.raises(CatalogError, match="TOLLGATE_CREDIT_CURRENCY is EUR"):
        create_app(settings.model_copy(update={"credit_currency": "EUR"}))
