"""gateway/tasks/reservations.py: one tenant's waiting submits reserved in one call of
``tollgate_submit_batch``, each decided as ``tollgate_submit`` decides one alone."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import make_tenant_key

from gateway.db import close_hot_pool, create_hot_pool
from gateway.limits.service import spend_periods
from gateway.settings import Settings
from gateway.tasks.reservations import Reservation, Reservations
from gateway.tasks.service import NewTask

pytestmark = pytest.mark.asyncio

CREATED_AT = datetime.now(UTC)  # the suite's other tests list the latest tasks


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[Any]:
    pg = await create_hot_pool(settings)
    yield pg
    await close_hot_pool(pg)


async def tenant(pool: Any, settings: Settings, credits_micros: int) -> tuple[str, str]:
    """A tenant with ``credits_micros`` and its one key's id."""
    tenant_id, _ = await make_tenant_key(settings, credits_micros=credits_micros)
    key_id = await pool.fetchval("SELECT id FROM api_keys WHERE tenant_id = $1", tenant_id)
    return tenant_id, key_id


def submit(
    tenant_id: str,
    key_id: str,
    amount: int,
    *,
    cap: int = 0,
    budgets: tuple[int | None, int | None, int | None] = (None, None, None),
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
    task_id: str | None = None,
) -> Reservation:
    task = NewTask(
        id=task_id or f"task-unified-1-{uuid.uuid4().hex[:12]}",
        tenant_id=tenant_id,
        model="flux-1-schnell",
        status="pending",
        progress=0,
        billing_rule="per_image",
        user_group="default",
        credits_reserved_micros=amount,
        credits_charged_micros=None,
        estimated_seconds=2,
        can_cancel=True,
        results=None,
        result_sizes=None,
        results_expire_at=None,
        error_code=None,
        error_message=None,
        created_at=CREATED_AT,
        attempt=0,
        api="unified",
        api_key_id=key_id,
        provider="siliconflow",
        request={"prompt": "a lighthouse"},
        quote={},
        callback_url=None,
        request_id=None,
    )
    return Reservation(
        task=task,
        cap=cap,
        periods=spend_periods(CREATED_AT),
        budgets=budgets,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )


async def state(pool: Any, tenant_id: str, key_id: str) -> tuple[Any, ...]:
    """The tenant's held credits and tasks in flight, its key's spends, its tasks (what
    they store, but their ids) and the sum of its holds."""
    row = await pool.fetchrow("SELECT held_micros, in_flight FROM tenants WHERE id = $1", tenant_id)
    spends = await pool.fetch(
        "SELECT period, spent_micros FROM key_spend WHERE api_key_id = $1 ORDER BY period",
        key_id,
    )
    tasks = [
        tuple(task)
        for task in await pool.fetch(
            "SELECT model, provider, status, request, quote, billing_rule, user_group, "
            "credits_reserved_micros, estimated_seconds, can_cancel, api, attempt, created_at "
            "FROM tasks WHERE tenant_id = $1 ORDER BY credits_reserved_micros",
            tenant_id,
        )
    ]
    holds = await pool.fetchval(
        "SELECT coalesce(sum(amount_micros), 0) FROM ledger_entries "
        "WHERE tenant_id = $1 AND kind = 'hold'",
        tenant_id,
    )
    return tuple(row), [tuple(spend) for spend in spends], tasks, holds


# Credits for 6,000; a daily budget of 5,000; at most 4 in flight. In order: 1,000 and
# 2,500 fit; 2,000 would take the day to 5,500; 3,000 is more than the 2,500 left; 500
# and 500 fit; then 4 are in flight.
AMOUNTS = [1_000, 2_500, 2_000, 3_000, 500, 500, 100]
EXPECTED = ["created", "created", "TGBUD:2,5000,3500", "TG402", "created", "created", "TG429"]


async def test_submits_that_wait_together_are_decided_in_order_as_each_alone(
    pool: Any, settings: Settings
) -> None:
    together, alone = Reservations(pool), Reservations(pool)
    outcomes = {}
    for name, reservations in (("together", together), ("alone", alone)):
        tenant_id, key_id = await tenant(pool, settings, 6_000)
        submits = [
            submit(tenant_id, key_id, amount, cap=4, budgets=(None, 5_000, None))
            for amount in AMOUNTS
        ]
        if reservations is together:
            answers = await asyncio.gather(*(together.reserve(s) for s in submits))
        else:  # one call of tollgate_submit each, one after the other
            answers = [await alone.reserve(s) for s in submits]
        outcomes[name] = (answers, await state(pool, tenant_id, key_id))
    assert outcomes["together"][0] == EXPECTED
    assert outcomes["alone"][0] == EXPECTED
    # The same rows: 4,500 held by 4 tasks, the key's spend 4,500 in each period.
    assert outcomes["together"][1] == outcomes["alone"][1]
    held, spends, tasks, holds = outcomes["together"][1]
    assert (held, len(tasks), holds) == ((4_500, 4), 4, 4_500)
    assert [(task[3]["prompt"], task[4]) for task in tasks] == [("a lighthouse", {})] * 4
    assert [spent for _, spent in spends] == [4_500, 4_500, 4_500]
    assert together.calls < len(AMOUNTS)  # they shared calls
    assert alone.calls == len(AMOUNTS)


async def test_one_idempotency_key_twice_goes_in_the_next_call(
    pool: Any, settings: Settings
) -> None:
    tenant_id, key_id = await tenant(pool, settings, 5_000)
    reservations = Reservations(pool)
    first = submit(tenant_id, key_id, 1_000, idempotency_key="k1", fingerprint="body-1")
    again = submit(tenant_id, key_id, 1_000, idempotency_key="k1", fingerprint="body-1")
    other = submit(tenant_id, key_id, 1_000, idempotency_key="k1", fingerprint="body-2")
    # A claim refused for credits goes with its refusal: the same key then reserves anew.
    refused = submit(tenant_id, key_id, 9_000, idempotency_key="k2", fingerprint="body-3")
    retried = submit(tenant_id, key_id, 2_000, idempotency_key="k2", fingerprint="body-3")
    answers = await asyncio.gather(
        *(reservations.reserve(s) for s in (first, again, other, refused, retried))
    )
    assert answers == [
        "created",
        f"duplicate:{first.task.id}",
        "conflict",
        "TG402",
        "created",
    ]
    held, _, tasks, holds = await state(pool, tenant_id, key_id)
    assert (held, len(tasks), holds) == ((3_000, 2), 2, 3_000)
    claims = await pool.fetch(
        "SELECT key, task_id FROM idempotency_keys WHERE tenant_id = $1 ORDER BY key", tenant_id
    )
    assert [tuple(claim) for claim in claims] == [("k1", first.task.id), ("k2", retried.task.id)]


async def test_a_bad_submit_fails_alone_and_the_rest_are_reserved(
    pool: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    tenant_id, key_id = await tenant(pool, settings, 10_000)
    reservations = Reservations(pool)
    taken = submit(tenant_id, key_id, 1_000)
    assert await reservations.reserve(taken) == "created"
    # A task id that exists already fails its insert, and with it the batch's one call.
    submits = [
        submit(tenant_id, key_id, 2_000),
        submit(tenant_id, key_id, 3_000, task_id=taken.task.id),
        submit(tenant_id, key_id, 4_000),
    ]
    with caplog.at_level(logging.WARNING, logger="tollgate.tasks"):
        answers = await asyncio.gather(
            *(reservations.reserve(s) for s in submits), return_exceptions=True
        )
    assert (answers[0], answers[2]) == ("created", "created")
    assert isinstance(answers[1], Exception)
    assert "reserving them one by one" in caplog.text
    held, _, tasks, holds = await state(pool, tenant_id, key_id)
    assert (held, len(tasks), holds) == ((7_000, 3), 3, 7_000)


async def test_a_spend_row_made_under_the_call_sends_its_submits_one_by_one(
    pool: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A key's first submit of a day from two processes at once: the other's spend row
    appears after the call read the key's rows; counted on it, the call would miss the
    other's spend, so it rolls back (TGRTY) and each submit goes alone."""
    tenant_id, key_id = await tenant(pool, settings, 10_000)
    _, day, _ = spend_periods(CREATED_AT)
    reservations = Reservations(pool)
    async with pool.acquire() as other:
        transaction = other.transaction()
        await transaction.start()
        await other.execute(
            "INSERT INTO key_spend (api_key_id, period, spent_micros) VALUES ($1, $2, 700)",
            key_id,
            day,
        )
        with caplog.at_level(logging.WARNING, logger="tollgate.tasks"):
            budgets = (None, 1_500, None)
            reserving = asyncio.gather(
                reservations.reserve(submit(tenant_id, key_id, 1_000, budgets=budgets)),
                reservations.reserve(submit(tenant_id, key_id, 300, budgets=budgets)),
            )
            await asyncio.sleep(0.5)
            assert not reserving.done()  # waiting on the other's new row
            await transaction.commit()
            # One by one, they count the other's 700: 1,700 would pass the day's 1,500.
            assert await reserving == ["TGBUD:2,1500,700", "created"]
    assert reservations.calls == 1
    assert "reserving 2 submits together failed" in caplog.text
    held, spends, tasks, _ = await state(pool, tenant_id, key_id)
    assert (held, len(tasks)) == ((300, 1), 1)
    assert dict(spends)[day] == 1_000


async def test_close_cancels_a_call_out_and_the_submits_waiting(
    pool: Any, settings: Settings
) -> None:
    """At shutdown: a call held up (here by a lock on the tenant's row) is cancelled, its
    transaction rolls back, and no submit's caller is left waiting."""
    tenant_id, key_id = await tenant(pool, settings, 10_000)
    reservations = Reservations(pool)
    async with pool.acquire() as other:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)
        reserving = [
            asyncio.create_task(reservations.reserve(submit(tenant_id, key_id, 1_000)))
            for _ in range(3)
        ]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in reserving)
        await asyncio.wait_for(reservations.close(), timeout=5)
        results = await asyncio.wait_for(
            asyncio.gather(*reserving, return_exceptions=True), timeout=5
        )
        assert all(isinstance(result, asyncio.CancelledError) for result in results)
        await transaction.rollback()
    held, _, tasks, holds = await state(pool, tenant_id, key_id)
    assert (held, tasks, holds) == ((0, 0), [], 0)
