"""Billing over HTTP: holds at submit, Idempotency-Key, admin credits, usage, the CLI.

The concurrency tests run the app under uvicorn in this event loop and fire
real parallel requests with httpx (litestar's test client serves one request
at a time). A task is finished here by playing the worker's part with
``gateway.tasks.lifecycle``; tests/workers/test_settlement.py runs real workers.
"""

import asyncio
import csv
import io
import json
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from conftest import assert_error, bearer, make_tenant_key, run_cli, scalar, serve_app, totals
from conftest import rows_of as count_rows
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.ledger import service as ledger
from gateway.ledger.reports import COLUMNS
from gateway.settings import Settings
from gateway.tasks import lifecycle

Client = AsyncTestClient[Any]

FLUX_IMAGE = 77_700  # flux-1-pro, per image, in micro-credits (¥0.37 × 0.14 × 1.5)
KREA_MEDIUM = 45_000  # krea-2-medium, per call ($0.030 × 1.5)
GENERATIONS = "/v1/images/generations"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
async def base_url(settings: Settings) -> AsyncIterator[str]:
    async with serve_app(settings) as url:
        yield url


def burst_client(base_url: str) -> httpx.AsyncClient:
    """A client that opens as many connections as there are requests in flight."""
    return httpx.AsyncClient(
        base_url=base_url,
        trust_env=False,
        timeout=60,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )


def admin(settings: Settings) -> dict[str, str]:
    return bearer(settings.admin_token)


async def ledger_problems(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return await ledger.check(conn)


async def submit(client: Client, key: str, body: dict[str, Any], **headers: str) -> Any:
    return await client.post(GENERATIONS, json=body, headers={**bearer(key), **headers})


async def submitted(client: Client, key: str, body: dict[str, Any]) -> str:
    response = await submit(client, key, body)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


async def finish(engine: AsyncEngine, task_id: str, images: int = 1) -> None:
    """Play the worker: claim attempt 0 and complete it with ``images`` results."""
    async with engine.begin() as conn:
        assert await lifecycle.claim(conn, task_id, 0, 30) is not None
        keys = [f"{task_id}/{i}.png" for i in range(images)]
        assert await lifecycle.complete(conn, task_id, 0, keys, 3600)


async def fail(engine: AsyncEngine, task_id: str) -> None:
    async with engine.begin() as conn:
        assert await lifecycle.fail(conn, task_id, 0, "generation_failed", "test failure")


tollgate = run_cli


async def rows_of(engine: AsyncEngine, tenant_id: str) -> dict[str, int]:
    return await count_rows(engine, tenant_id, tables=("tasks", "idempotency_keys"))


# ---------------------------------------------------------------- reservations


async def _sample_available(engine: AsyncEngine, tenant_id: str, stop: asyncio.Event) -> list[int]:
    seen = []
    while not stop.is_set():
        balance, held = await totals(engine, tenant_id)
        seen.append(balance - held)
        await asyncio.sleep(0.005)
    return seen


async def test_200_concurrent_submissions_reserve_exactly_what_the_credits_cover(
    settings: Settings, base_url: str, engine: AsyncEngine, redis: Redis
) -> None:
    k = 5
    tenant_id, key = await make_tenant_key(settings, credits_micros=k * FLUX_IMAGE)
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_available(engine, tenant_id, stop))
    async with burst_client(base_url) as http:
        responses = await asyncio.gather(
            *(
                http.post(
                    GENERATIONS,
                    json={"model": "flux-1-pro", "prompt": f"race {i}", "n": 1},
                    headers=bearer(key),
                )
                for i in range(200)
            )
        )
    stop.set()
    available_seen = await sampler

    assert Counter(r.status_code for r in responses) == {200: k, 402: 200 - k}
    for refused in (r for r in responses if r.status_code == 402):
        body = refused.json()
        assert set(body) == {"error"}
        assert body["error"]["code"] == "insufficient_quota"
        assert body["error"]["type"] == "insufficient_quota"
        assert body["error"]["message"]
    accepted = {r.json()["id"] for r in responses if r.status_code == 200}
    assert len(accepted) == k

    assert available_seen
    assert min(available_seen) >= 0
    assert await totals(engine, tenant_id) == (k * FLUX_IMAGE, k * FLUX_IMAGE)
    counts = await rows_of(engine, tenant_id)
    assert counts["tasks"] == k
    assert counts["hold"] == k
    async with engine.connect() as conn:
        in_db = set(
            (
                await conn.execute(
                    text("SELECT id FROM tasks WHERE tenant_id = :t"), {"t": tenant_id}
                )
            ).scalars()
        )
    assert in_db == accepted
    assert await redis.zcard(settings.queue_name) == k
    assert await ledger_problems(engine) == []


@pytest.mark.timeout(900)
async def test_1000_concurrent_submissions_on_one_tenant_never_overspend(
    settings: Settings, base_url: str, engine: AsyncEngine, redis: Redis
) -> None:
    """The hot tenant: a thousand submits at once race for credits that cover 37 of them.

    Every request is in flight at once, so the last answer comes after all the others:
    on a loaded machine that is minutes, not the burst client's 60 s.
    """
    k = 37
    tenant_id, key = await make_tenant_key(settings, credits_micros=k * FLUX_IMAGE)
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_available(engine, tenant_id, stop))
    gate = asyncio.Event()

    async def one(http: httpx.AsyncClient, i: int) -> httpx.Response:
        await gate.wait()  # every request is ready before the first is sent
        return await http.post(
            GENERATIONS,
            json={"model": "flux-1-pro", "prompt": f"hot {i}", "n": 1},
            headers=bearer(key),
        )

    async with burst_client(base_url) as http:
        http.timeout = httpx.Timeout(600)
        pending = [asyncio.create_task(one(http, i)) for i in range(1000)]
        await asyncio.sleep(0)
        gate.set()
        responses = await asyncio.gather(*pending)
    stop.set()
    available_seen = await sampler

    assert Counter(r.status_code for r in responses) == {200: k, 402: 1000 - k}
    accepted = {r.json()["id"] for r in responses if r.status_code == 200}
    assert len(accepted) == k
    assert min(available_seen) >= 0
    assert await totals(engine, tenant_id) == (k * FLUX_IMAGE, k * FLUX_IMAGE)
    counts = await rows_of(engine, tenant_id)
    assert (counts["tasks"], counts["hold"]) == (k, k)
    async with engine.connect() as conn:
        in_flight = await conn.scalar(
            text("SELECT in_flight FROM tenants WHERE id = :t"), {"t": tenant_id}
        )
    assert in_flight == k
    assert await redis.zcard(settings.queue_name) == k
    assert await ledger_problems(engine) == []


async def test_a_refused_submission_leaves_no_task_hold_key_or_job(
    settings: Settings, client: Client, engine: AsyncEngine, redis: Redis
) -> None:
    tenant_id, key = await make_tenant_key(settings, credits_micros=0)
    body = {"model": "krea-2-medium", "prompt": "no credits"}
    response = await submit(client, key, body, **{"Idempotency-Key": "broke-1"})
    assert_error(response, 402, "insufficient_quota")
    assert response.json()["error"]["type"] == "insufficient_quota"

    assert await rows_of(engine, tenant_id) == {"tasks": 0, "idempotency_keys": 0}
    assert await totals(engine, tenant_id) == (0, 0)
    assert await redis.zcard(settings.queue_name) == 0

    # The key was not burnt by the refusal: once topped up, the same request goes through.
    topped = await client.post(
        f"/admin/tenants/{tenant_id}/topup", json={"amount": "1"}, headers=admin(settings)
    )
    assert topped.status_code == 200, topped.text
    retried = await submit(client, key, body, **{"Idempotency-Key": "broke-1"})
    assert retried.status_code == 200, retried.text
    assert await redis.zcard(settings.queue_name) == 1


async def test_credits_reserved_is_what_the_tenant_holds(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    turbo = await submit(
        client,
        key,
        {
            "model": "stable-diffusion-3-5-large-turbo",
            "prompt": "a cat",
            "size": "1024x512",
            "num_inference_steps": 4,
        },
    )
    assert turbo.status_code == 200, turbo.text
    assert '"credits_reserved":0.001344' in turbo.text  # 0.5 MP × 4 steps × 0.000672
    flux = await submit(client, key, {"model": "flux-1-pro", "prompt": "a cat", "n": 2})
    assert flux.status_code == 200, flux.text
    assert '"credits_reserved":0.1554' in flux.text

    assert await totals(engine, tenant_id) == (1_000_000_000, 1_344 + 155_400)
    shown = await client.get(f"/admin/tenants/{tenant_id}/balance", headers=admin(settings))
    assert shown.status_code == 200
    balance = shown.json()
    assert '"held":0.156744' in shown.text
    assert balance["held_micros"] == 156_744
    assert balance["available_micros"] == 1_000_000_000 - 156_744
    assert {(h["task_id"], h["amount_micros"]) for h in balance["open_holds"]} == {
        (turbo.json()["id"], 1_344),
        (flux.json()["id"], 155_400),
    }


# ---------------------------------------------------------------- Idempotency-Key


async def test_the_same_idempotency_key_sent_100_times_at_once_makes_one_task(
    settings: Settings, base_url: str, engine: AsyncEngine, redis: Redis
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    body = {"model": "krea-2-medium", "prompt": "exactly once"}
    headers = {**bearer(key), "Idempotency-Key": "order-42"}
    async with burst_client(base_url) as http:
        responses = await asyncio.gather(
            *(http.post(GENERATIONS, json=body, headers=headers) for _ in range(100))
        )
        assert [r.status_code for r in responses] == [200] * 100, {
            r.status_code: r.text for r in responses
        }
        first = responses[0].json()
        assert all(r.json() == first for r in responses)
        assert len({r.content for r in responses}) == 1
        assert await rows_of(engine, tenant_id) == {
            "topup": 1,
            "hold": 1,
            "tasks": 1,
            "idempotency_keys": 1,
        }
        assert await totals(engine, tenant_id) == (1_000_000_000, KREA_MEDIUM)
        assert await redis.zcard(settings.queue_name) == 1

        changed = await http.post(
            GENERATIONS, json={**body, "prompt": "something else"}, headers=headers
        )
        assert_error(changed, 409, "conflict", "Idempotency-Key")

        _, other_key = await make_tenant_key(settings)
        other = await http.post(
            GENERATIONS, json=body, headers={**bearer(other_key), "Idempotency-Key": "order-42"}
        )
        assert other.status_code == 200, other.text
        assert other.json()["id"] != first["id"]

        longest = await http.post(
            GENERATIONS, json=body, headers={**bearer(key), "Idempotency-Key": "k" * 255}
        )
        assert longest.status_code == 200, longest.text
        too_long = await http.post(
            GENERATIONS, json=body, headers={**bearer(key), "Idempotency-Key": "k" * 256}
        )
        assert_error(too_long, 400, "invalid_request", "Idempotency-Key")
    assert (await rows_of(engine, tenant_id))["tasks"] == 2
    assert await redis.zcard(settings.queue_name) == 3


# ---------------------------------------------------------------- admin: credits


async def test_topup_takes_exact_decimals_and_refuses_what_is_not_one(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    tenant_id, _ = await make_tenant_key(settings, credits_micros=0)
    url = f"/admin/tenants/{tenant_id}/topup"
    topped = await client.post(url, json={"amount": "12.5"}, headers=admin(settings))
    assert topped.status_code == 200, topped.text
    assert topped.json()["balance"] == 12.5
    assert topped.json()["balance_micros"] == 12_500_000
    assert topped.json()["applied"] is True

    # A JSON number is read from its text, never through a float.
    number = await client.post(
        url,
        content=b'{"amount": 0.1}',
        headers={**admin(settings), "Content-Type": "application/json"},
    )
    assert number.status_code == 200, number.text
    assert number.json()["balance_micros"] == 12_600_000
    last = await scalar(
        engine,
        "SELECT amount_micros FROM ledger_entries WHERE tenant_id = :t ORDER BY id DESC LIMIT 1",
        t=tenant_id,
    )
    assert last == 100_000

    for amount in ("0.0000001", "1.0000001", 0.0000001):
        too_fine = await client.post(url, json={"amount": amount}, headers=admin(settings))
        assert_error(too_fine, 400, "invalid_request", "amount")
    for amount in ("-1", "0", "-0.5"):
        refused = await client.post(url, json={"amount": amount}, headers=admin(settings))
        assert_error(refused, 400, "invalid_request", "amount")
    garbage = await client.post(url, json={"amount": "twelve"}, headers=admin(settings))
    assert_error(garbage, 400, "invalid_request", "amount")
    assert await totals(engine, tenant_id) == (12_600_000, 0)


async def test_a_topup_retried_with_its_idempotency_key_adds_once(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    tenant_id, _ = await make_tenant_key(settings, credits_micros=0)
    url = f"/admin/tenants/{tenant_id}/topup"
    body = {"amount": "3", "reason": "invoice 7", "idempotency_key": f"inv-7-{tenant_id}"}
    first = await client.post(url, json=body, headers=admin(settings))
    again = await client.post(url, json=body, headers=admin(settings))
    assert first.json()["applied"] is True
    assert again.status_code == 200
    assert again.json()["applied"] is False
    assert again.json()["balance_micros"] == 3_000_000
    assert await totals(engine, tenant_id) == (3_000_000, 0)
    assert (await rows_of(engine, tenant_id))["topup"] == 1


async def test_a_topup_key_used_for_another_tenant_does_not_swallow_the_topup(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    a, _ = await make_tenant_key(settings, credits_micros=0)
    b, _ = await make_tenant_key(settings, credits_micros=0)
    body = {"amount": "3", "idempotency_key": f"shared-{a}"}
    assert (
        await client.post(f"/admin/tenants/{a}/topup", json=body, headers=admin(settings))
    ).json()["applied"]
    other = await client.post(f"/admin/tenants/{b}/topup", json=body, headers=admin(settings))
    # Either B is credited, or the operator is told the key is taken: never a silent no-op.
    if other.status_code == 200:
        assert await totals(engine, b) == (3_000_000, 0)
    else:
        assert_error(other, 409, "conflict", "idempotency")


async def test_adjust_needs_a_reason_and_never_uncovers_holds(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings, credits_micros=10_000_000)
    url = f"/admin/tenants/{tenant_id}/adjust"
    for body in ({"amount": "-1.5"}, {"amount": "-1.5", "reason": "  "}):
        missing = await client.post(url, json=body, headers=admin(settings))
        assert_error(missing, 400, "invalid_request", "reason")
    zero = await client.post(url, json={"amount": "0", "reason": "x"}, headers=admin(settings))
    assert_error(zero, 400, "invalid_request", "amount")

    down = await client.post(
        url, json={"amount": "-1.5", "reason": "goodwill reversed"}, headers=admin(settings)
    )
    assert down.status_code == 200, down.text
    assert down.json()["balance_micros"] == 8_500_000
    up = await client.post(
        url, json={"amount": "0.25", "reason": "credit"}, headers=admin(settings)
    )
    assert up.json()["balance_micros"] == 8_750_000

    await submitted(client, key, {"model": "flux-1-pro", "prompt": "held", "n": 2})
    # 8.75 balance, 0.1554 held: taking 8.594601 would leave the hold uncovered.
    uncovered = await client.post(
        url, json={"amount": "-8.594601", "reason": "too much"}, headers=admin(settings)
    )
    assert_error(uncovered, 409, "conflict", "uncovered")
    assert await totals(engine, tenant_id) == (8_750_000, 155_400)
    exact = await client.post(
        url, json={"amount": "-8.5946", "reason": "all that is free"}, headers=admin(settings)
    )
    assert exact.status_code == 200, exact.text
    assert exact.json()["available_micros"] == 0
    assert await totals(engine, tenant_id) == (155_400, 155_400)
    reasons = await scalar(
        engine,
        "SELECT STRING_AGG(reason, '|' ORDER BY id) FROM ledger_entries "
        "WHERE tenant_id = :t AND kind = 'adjustment'",
        t=tenant_id,
    )
    assert reasons == "goodwill reversed|credit|all that is free"


async def test_balance_lists_open_holds_until_they_settle(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings, credits_micros=1_000_000)
    task_id = await submitted(client, key, {"model": "krea-2-medium", "prompt": "hold me"})
    url = f"/admin/tenants/{tenant_id}/balance"
    shown = (await client.get(url, headers=admin(settings))).json()
    assert shown["balance"] == 1
    assert shown["held_micros"] == KREA_MEDIUM
    assert shown["available_micros"] == 1_000_000 - KREA_MEDIUM
    [open_hold] = shown["open_holds"]
    assert open_hold["task_id"] == task_id
    assert open_hold["amount_micros"] == KREA_MEDIUM
    await finish(engine, task_id)
    settled = (await client.get(url, headers=admin(settings))).json()
    assert settled["open_holds"] == []
    assert settled["held_micros"] == 0
    assert settled["balance_micros"] == 1_000_000 - KREA_MEDIUM
    missing = await client.get("/admin/tenants/ten_nope/balance", headers=admin(settings))
    assert_error(missing, 404, "not_found")


async def test_refund_gives_back_part_or_all_of_a_charge_and_never_more(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings, credits_micros=1_000_000)
    task_id = await submitted(client, key, {"model": "flux-1-pro", "prompt": "refund me"})
    await finish(engine, task_id)
    assert await totals(engine, tenant_id) == (1_000_000 - FLUX_IMAGE, 0)
    url = f"/admin/tasks/{task_id}/refund"

    no_reason = await client.post(
        url, json={"amount": "0.01", "reason": " "}, headers=admin(settings)
    )
    assert_error(no_reason, 400, "invalid_request", "reason")
    part = await client.post(
        url, json={"amount": "0.01", "reason": "blurry"}, headers=admin(settings)
    )
    assert part.status_code == 200, part.text
    assert part.json() == {"task_id": task_id, "refunded": 0.01}
    over = await client.post(
        url, json={"amount": "0.07", "reason": "more"}, headers=admin(settings)
    )
    assert_error(over, 409, "conflict", "67700")
    rest = await client.post(url, json={"reason": "all of it"}, headers=admin(settings))
    assert rest.status_code == 200, rest.text
    assert rest.json()["refunded"] == 0.0677
    nothing_left = await client.post(url, json={"reason": "again"}, headers=admin(settings))
    assert_error(nothing_left, 409, "conflict")
    assert await totals(engine, tenant_id) == (1_000_000, 0)
    assert (await rows_of(engine, tenant_id))["refund"] == 2

    failed_id = await submitted(client, key, {"model": "krea-2-medium", "prompt": "failed"})
    await fail(engine, failed_id)
    free = await client.post(
        f"/admin/tasks/{failed_id}/refund", json={"reason": "x"}, headers=admin(settings)
    )
    assert_error(free, 409, "conflict")
    unknown = await client.post(
        "/admin/tasks/task-unified-0-nope/refund", json={"reason": "x"}, headers=admin(settings)
    )
    assert_error(unknown, 404, "not_found")
    assert await ledger_problems(engine) == []


# ---------------------------------------------------------------- usage


async def test_usage_reports_a_tenants_own_tasks_as_json_and_csv(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    a, key_a = await make_tenant_key(settings)
    b, key_b = await make_tenant_key(settings)
    done = await submitted(client, key_a, {"model": "krea-2-medium", "prompt": "ok"})
    await finish(engine, done)
    await fail(engine, await submitted(client, key_a, {"model": "krea-2-medium", "prompt": "no"}))
    flux = await submitted(client, key_a, {"model": "flux-1-pro", "prompt": "two", "n": 2})
    await finish(engine, flux, images=2)
    await submitted(client, key_a, {"model": "flux-1-pro", "prompt": "pending"})
    await finish(engine, await submitted(client, key_b, {"model": "krea-2-medium", "prompt": "b"}))

    report = await client.get(f"/admin/tenants/{a}/usage", headers=admin(settings))
    assert report.status_code == 200, report.text
    assert report.json()["tenant_id"] == a
    rows = {row["model"]: row for row in report.json()["data"]}
    assert set(rows) == {"flux-1-pro", "krea-2-medium"}
    krea, flux_row = rows["krea-2-medium"], rows["flux-1-pro"]
    assert (krea["tasks"], krea["completed"], krea["failed"], krea["images"]) == (2, 1, 1, 1)
    assert krea["charged_micros"] == KREA_MEDIUM
    assert (flux_row["tasks"], flux_row["completed"], flux_row["failed"]) == (2, 1, 0)
    assert flux_row["images"] == 2
    assert flux_row["charged_micros"] == 2 * FLUX_IMAGE
    assert '"charged":0.1554' in report.text
    for row in rows.values():
        assert row["refunded_micros"] == 0
        assert row["margin_micros"] == row["charged_micros"] - row["upstream_cost_micros"]
        assert 0 < row["upstream_cost_micros"] < row["charged_micros"]  # the markup
    assert sum(r["upstream_cost_micros"] for r in rows.values()) == await scalar(
        engine,
        "SELECT COALESCE(SUM(upstream_cost_micros), 0) FROM tasks WHERE tenant_id = :t",
        t=a,
    )

    as_csv = await client.get(f"/admin/tenants/{a}/usage?format=csv", headers=admin(settings))
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    header, *lines = list(csv.reader(io.StringIO(as_csv.text)))
    assert header == [
        "day",
        "model",
        "tasks",
        "completed",
        "failed",
        "images",
        "charged",
        "refunded",
        "adjusted",
        "net",
        "upstream_cost",
        "margin",
    ]
    assert tuple(header) == COLUMNS
    by_model = {line[1]: line for line in lines}
    assert by_model["flux-1-pro"][2:7] == ["2", "1", "0", "2", "0.1554"]
    assert by_model["krea-2-medium"][2:7] == ["2", "1", "1", "1", "0.045"]

    other = (await client.get(f"/admin/tenants/{b}/usage", headers=admin(settings))).json()
    assert [(r["model"], r["tasks"], r["charged_micros"]) for r in other["data"]] == [
        ("krea-2-medium", 1, KREA_MEDIUM)
    ]
    bad = await client.get(f"/admin/tenants/{a}/usage?format=xml", headers=admin(settings))
    assert bad.status_code == 400


# ---------------------------------------------------------------- CLI


async def test_cli_tops_up_shows_reports_and_checks_the_ledger(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings, credits_micros=0)
    code, out, err = await tollgate(settings, "credits", "topup", tenant_id, "5", "--reason", "x")
    assert code == 0, err
    assert json.loads(out)["balance_micros"] == 5_000_000
    code, out, err = await tollgate(
        settings, "credits", "adjust", tenant_id, "--reason", "fix", "--", "-1.5"
    )
    assert code == 0, err
    assert json.loads(out)["balance_micros"] == 3_500_000
    code, _, err = await tollgate(settings, "credits", "topup", tenant_id, "0.0000001")
    assert code == 1
    assert "amount" in err

    task_id = await submitted(client, key, {"model": "krea-2-medium", "prompt": "cli"})
    code, out, err = await tollgate(settings, "credits", "show", tenant_id)
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["balance_micros"], shown["held_micros"]) == (3_500_000, KREA_MEDIUM)
    assert [h["task_id"] for h in shown["open_holds"]] == [task_id]

    await finish(engine, task_id)
    code, out, err = await tollgate(
        settings, "credits", "refund", task_id, "--amount", "0.01", "--reason", "cli refund"
    )
    assert code == 0, err
    assert json.loads(out) == {"task_id": task_id, "refunded_micros": 10_000}

    code, out, err = await tollgate(settings, "usage", tenant_id, "--csv")
    assert code == 0, err
    header, *lines = list(csv.reader(io.StringIO(out)))
    assert tuple(header) == COLUMNS
    assert [line[1:7] for line in lines] == [["krea-2-medium", "1", "1", "0", "1", "0.045"]]
    # The refund counts: charged 0.045, refunded 0.01, cost $0.030, margin 0.005.
    assert lines[0][7:] == ["0.01", "0", "0.035", "0.03", "0.005"]
    code, out, err = await tollgate(settings, "usage", tenant_id)
    assert code == 0, err
    assert [row["tasks"] for row in json.loads(out)] == [1]

    code, out, err = await tollgate(settings, "ledger", "check")
    assert code == 0, err
    assert "ledger ok" in out
    assert await totals(engine, tenant_id) == (3_500_000 - KREA_MEDIUM + 10_000, 0)


async def test_cli_adjusts_by_a_negative_amount_as_written(settings: Settings) -> None:
    """``tollgate credits adjust acme -2 --reason …``: no ``--`` needed (issue 13)."""
    tenant_id, _ = await make_tenant_key(settings, credits_micros=5_000_000)
    code, out, err = await tollgate(settings, "credits", "adjust", tenant_id, "-2", "--reason", "x")
    assert code == 0, err
    assert json.loads(out)["balance_micros"] == 3_000_000
    code, out, err = await tollgate(
        settings, "credits", "adjust", tenant_id, "--reason", "y", "-0.5"
    )
    assert code == 0, err
    assert json.loads(out)["balance_micros"] == 2_500_000
    # An option that does not exist is still refused, not taken for the amount.
    code, _, err = await tollgate(
        settings, "credits", "adjust", tenant_id, "1", "--reason", "z", "--bogus"
    )
    assert code == 2
    assert "--bogus" in err


async def test_usage_default_range_includes_todays_tasks_whatever_the_host_timezone(
    settings: Settings, client: Client, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    await finish(engine, await submitted(client, key, {"model": "krea-2-medium", "prompt": "tz"}))
    # POSIX TZ: a host clock 24 hours behind UTC, so its local date is always yesterday's.
    code, out, err = await tollgate(settings, "usage", tenant_id, TZ="XYZ+24")
    assert code == 0, err
    assert [row["tasks"] for row in json.loads(out)] == [1]


async def test_topup_amount_in_the_cli_is_exact(settings: Settings) -> None:
    tenant_id, _ = await make_tenant_key(settings, credits_micros=0)
    code, out, err = await tollgate(settings, "credits", "topup", tenant_id, "0.000001")
    assert code == 0, err
    assert json.loads(out)["balance_micros"] == 1
    assert Decimal(str(json.loads(out)["balance"])) == Decimal("0.000001")
