"""Settlement: every hold is captured or released exactly once, whatever happens to workers.

Real workers against the simulator for the ordinary outcomes; ``lifecycle`` and
``generate_task`` driven directly for races and crashes. A crash is a
``Crash`` (a BaseException, as a killed process leaves no ``except`` to run)
raised before the task's end is sent, or an error raised inside the ending
call's transaction once its ledger row is written (a trigger: the settlement
runs in the database, ``tollgate_settle``): the transaction rolls back, so
nothing of the settlement may remain, and the next attempt settles the hold
once. The worker's ending call is its own transaction, so there is no point
between the settlement and its commit for a worker to die at.
"""

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import (
    Sim,
    bearer,
    make_settings,
    make_tenant_key,
    scalar,
    start_worker,
    stop_worker,
    totals,
    worker_deps,
)
from conftest import wait_for_status as wait_for
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.db import Statements, create_engine
from gateway.ledger import service as ledger
from gateway.settings import Settings
from gateway.tasks import lifecycle
from workers.deps import WorkerDeps
from workers.generate import generate_task

Client = AsyncTestClient[Any]

START = 1_000_000_000  # what make_tenant_key tops up
KREA_MEDIUM = 45_000  # the shipped sale price: $0.030 × 1.5
FLUX_IMAGE = 77_700  # ¥0.37 × 0.14 × 1.5
BATCH = 500


@pytest.fixture
def settings(database_url: str, simulator_url: str, tmp_path: Path) -> Settings:
    """Short leases and polls, so a lost worker's task moves on within a second."""
    return make_settings(
        database_url,
        simulator_url,
        tmp_path / "storage",
        lease_seconds=0.6,
        poll_interval_seconds=0.05,
        upstream_retry_base_seconds=0.05,
    )


@pytest.fixture
async def deps(settings: Settings, engine: AsyncEngine) -> AsyncIterator[WorkerDeps]:
    async with httpx.AsyncClient(trust_env=False) as http:
        yield worker_deps(settings, engine, http)


async def submit(client: Client, key: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/images/generations", json=body, headers=bearer(key))
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


async def entries(engine: AsyncEngine, task_id: str) -> list[tuple[str, int, int | None]]:
    """The task's ledger rows, oldest first: (kind, amount_micros, hold_micros)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT kind, amount_micros, hold_micros FROM ledger_entries "
                "WHERE task_id = :id ORDER BY id"
            ),
            {"id": task_id},
        )
        return [(r[0], int(r[1]), r[2]) for r in rows]


async def task_row(engine: AsyncEngine, task_id: str) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                text(
                    "SELECT status, attempt, credits_charged_micros, upstream_cost_micros, "
                    "images_delivered, error_code FROM tasks WHERE id = :id"
                ),
                {"id": task_id},
            )
        ).one()


async def assert_ledger_clean(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        assert await ledger.check(conn) == []


# ---------------------------------------------------------------- through a real worker


@pytest.mark.parametrize(
    ("body", "charge", "shown", "cost"),
    [
        # Upstream cost: $0.030, in credits 0.03; ¥0.74 at 0.14, 0.1036.
        ({"model": "krea-2-medium", "prompt": "per call"}, KREA_MEDIUM, "0.045", (30_000, "USD")),
        (
            {"model": "flux-1-pro", "prompt": "two images", "n": 2},
            2 * FLUX_IMAGE,
            "0.1554",
            (103_600, "CNY"),
        ),
    ],
    ids=["krea-2-medium-per-call", "flux-1-pro-n2"],
)
@pytest.mark.usefixtures("worker", "simulator")
async def test_a_completed_task_is_charged_its_reservation(
    client: Client,
    settings: Settings,
    engine: AsyncEngine,
    body: dict[str, Any],
    charge: int,
    shown: str,
    cost: tuple[int, str],
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    task = await submit(client, key, body)
    assert await totals(engine, tenant_id) == (START, charge)
    done = await wait_for(client, key, task["id"], {"completed", "failed"})
    assert done["status"] == "completed", done
    assert done["usage"]["credits_charged"] == done["usage"]["credits_reserved"]
    response = await client.get(f"/v1/tasks/{task['id']}", headers=bearer(key))
    assert f'"credits_charged":{shown}' in response.text
    assert len(done["results"]) == body.get("n", 1)
    assert await totals(engine, tenant_id) == (START - charge, 0)
    assert await entries(engine, task["id"]) == [
        ("hold", charge, None),
        ("capture", charge, charge),
    ]
    status, _, charged, cost_micros, images, _ = await task_row(engine, task["id"])
    assert (status, charged, images) == ("completed", charge, body.get("n", 1))
    currency = await scalar(
        engine, "SELECT upstream_cost_currency FROM tasks WHERE id = :id", id=task["id"]
    )
    assert (cost_micros, currency) == cost
    await assert_ledger_clean(engine)


@pytest.mark.usefixtures("worker")
async def test_a_failed_task_costs_nothing_and_releases_its_hold(
    client: Client, settings: Settings, engine: AsyncEngine, simulator: Sim
) -> None:
    await simulator.configure(error_kind="job_failed")
    tenant_id, key = await make_tenant_key(settings)
    task = await submit(client, key, {"model": "krea-2-medium", "prompt": "fail"})
    done = await wait_for(client, key, task["id"], {"completed", "failed"})
    assert done["status"] == "failed", done
    assert done["usage"]["credits_charged"] == 0
    assert await totals(engine, tenant_id) == (START, 0)
    assert await entries(engine, task["id"]) == [
        ("hold", KREA_MEDIUM, None),
        ("release", KREA_MEDIUM, KREA_MEDIUM),
    ]
    await assert_ledger_clean(engine)


async def test_a_task_past_its_deadline_is_failed_and_released(
    database_url: str, simulator_url: str, tmp_path: Path, simulator: Sim
) -> None:
    settings = make_settings(database_url, simulator_url, tmp_path / "s", task_deadline_seconds=5)
    await simulator.configure(latency=60)
    tenant_id, key = await make_tenant_key(settings)
    engine = create_engine(settings)
    try:
        async with AsyncTestClient(
            app=create_app(settings), base_url="http://testserver.local"
        ) as c:
            task = await submit(c, key, {"model": "krea-2-medium", "prompt": "slow"})
            arq_worker, running = start_worker(settings)
            try:
                done = await wait_for(c, key, task["id"], {"completed", "failed"}, wait=15)
            finally:
                await stop_worker(arq_worker, running)
        assert done["status"] == "failed"
        assert done["error"]["code"] == "timeout"
        assert done["usage"]["credits_charged"] == 0
        assert await totals(engine, tenant_id) == (START, 0)
        assert [kind for kind, *_ in await entries(engine, task["id"])] == ["hold", "release"]
        await assert_ledger_clean(engine)
    finally:
        await engine.dispose()


async def backdate(engine: AsyncEngine, task_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE tasks SET created_at = now() - interval '1 hour' WHERE id = :id"),
            {"id": task_id},
        )


async def test_the_sweeper_releases_an_overdue_tasks_hold_and_fences_its_worker(
    client: Client, settings: Settings, engine: AsyncEngine, deps: WorkerDeps, simulator: Sim
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    task = await submit(client, key, {"model": "flux-1-pro", "prompt": "lost", "n": 2})
    await backdate(engine, task["id"])
    async with engine.begin() as conn:
        # 30 minutes: only tasks this old are swept, not other tests' pending ones.
        swept = await lifecycle.fail_overdue(conn, 1800, BATCH)
    assert task["id"] in swept
    status, attempt, charged, _, _, code = await task_row(engine, task["id"])
    assert (status, attempt, charged, code) == ("failed", 1, 0, "timeout")
    assert await totals(engine, tenant_id) == (START, 0)
    assert [kind for kind, *_ in await entries(engine, task["id"])] == ["hold", "release"]
    # The job queued for attempt 0 arrives late: it does nothing, and settles nothing again.
    assert (await generate_task({"deps": deps}, task["id"], 0)).startswith("skipped")
    assert (await simulator.stats())["submits"] == 0
    async with engine.begin() as conn:
        assert await lifecycle.fail_overdue(conn, 1800, BATCH) == []
    assert len(await entries(engine, task["id"])) == 2
    await assert_ledger_clean(engine)


async def test_fewer_images_than_quoted_cost_their_share_and_free_the_rest(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    task = await submit(client, key, {"model": "flux-1-pro", "prompt": "three", "n": 3})
    hold = 3 * FLUX_IMAGE
    assert await totals(engine, tenant_id) == (START, hold)
    async with engine.begin() as conn:
        assert await lifecycle.claim(conn, task["id"], 0, settings.lease_seconds) is not None
    async with engine.begin() as conn:
        keys = [f"{task['id']}/0.png", f"{task['id']}/1.png"]
        assert await lifecycle.complete(conn, task["id"], 0, keys, 3600)
    charge = 2 * FLUX_IMAGE
    assert await entries(engine, task["id"]) == [("hold", hold, None), ("capture", charge, hold)]
    assert await totals(engine, tenant_id) == (START - charge, 0)
    _, _, charged, _, images, _ = await task_row(engine, task["id"])
    assert (charged, images) == (charge, 2)
    shown = await client.get(f"/v1/tasks/{task['id']}", headers=bearer(key))
    assert '"credits_charged":0.1554' in shown.text
    assert '"credits_reserved":0.2331' in shown.text
    await assert_ledger_clean(engine)


async def test_an_end_outside_a_transaction_settles_and_returns_its_callback_delivery(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    """The worker's way: claim and end as single autocommit statements (``Statements``);
    the end's callback delivery comes back with it, committed with the settlement."""
    tenant_id, key = await make_tenant_key(settings)
    task_id = (await submit(client, key, {"model": "krea-2-medium", "prompt": "hook"}))["id"]
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE tasks SET callback_url = 'https://receiver.example/hook' WHERE id = :id"),
            {"id": task_id},
        )
    db = Statements(engine)
    claimed = await lifecycle.claim(db, task_id, 0, 30)
    assert claimed is not None
    keys = [f"{task_id}/0.png"]
    ended = await lifecycle.complete(db, task_id, 0, keys, 3600, quote=claimed.quote)
    assert ended is not None
    assert (ended.status, ended.settled, ended.charged_micros) == ("completed", True, KREA_MEDIUM)
    assert ended.delivery_id is not None
    assert re.fullmatch(r"msg_[0-9a-f]{24}", ended.delivery_id)
    async with engine.connect() as conn:
        deliveries = await conn.execute(
            text("SELECT id, status, attempts, url FROM callback_deliveries WHERE task_id = :id"),
            {"id": task_id},
        )
        assert [tuple(row) for row in deliveries] == [
            (ended.delivery_id, "pending", 0, "https://receiver.example/hook")
        ]
    assert await totals(engine, tenant_id) == (START - KREA_MEDIUM, 0)
    assert await lifecycle.complete(db, task_id, 0, keys, 3600, quote=claimed.quote) is None
    assert await lifecycle.fail(db, task_id, 0, "late", "too late") is None
    assert len(await entries(engine, task_id)) == 2
    await assert_ledger_clean(engine)


# ---------------------------------------------------------------- races


async def test_two_concurrent_completions_of_one_attempt_capture_once(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    task_id = (await submit(client, key, {"model": "krea-2-medium", "prompt": "race"}))["id"]
    async with engine.begin() as conn:
        assert await lifecycle.claim(conn, task_id, 0, 30) is not None
    results = [f"{task_id}/0.png"]
    async with engine.connect() as first, engine.connect() as second:
        await first.begin()
        await second.begin()
        assert await lifecycle.complete(first, task_id, 0, results, 3600)
        # The second transaction waits on the task row the first has updated...
        racing = asyncio.create_task(lifecycle.complete(second, task_id, 0, results, 3600))
        await asyncio.sleep(0.3)
        assert not racing.done()
        await first.commit()
        # ...and, once it commits, finds the task no longer processing.
        assert await racing is None
        await second.commit()
    assert await entries(engine, task_id) == [
        ("hold", KREA_MEDIUM, None),
        ("capture", KREA_MEDIUM, KREA_MEDIUM),
    ]
    assert await totals(engine, tenant_id) == (START - KREA_MEDIUM, 0)
    await assert_ledger_clean(engine)


async def test_settling_a_settled_hold_again_changes_nothing(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    task_id = (await submit(client, key, {"model": "krea-2-medium", "prompt": "twice"}))["id"]
    async with engine.begin() as conn:
        assert await lifecycle.claim(conn, task_id, 0, 30) is not None
        assert await lifecycle.complete(conn, task_id, 0, [f"{task_id}/0.png"], 3600)
    after_first = await totals(engine, tenant_id)
    assert after_first == (START - KREA_MEDIUM, 0)
    async with engine.connect() as conn:
        trans = await conn.begin()
        # The hold's settlement, written again as tollgate_settle writes it: no ledger row,
        # no change to the tenant's balance or holds. (It frees an in-flight slot: one is
        # taken first, as another open task of the tenant would, and all rolled back.)
        await conn.execute(
            text("UPDATE tenants SET in_flight = in_flight + 1 WHERE id = :id"), {"id": tenant_id}
        )
        settled = await conn.execute(
            text(
                "SELECT settled FROM tollgate_settle(ROW(:id, :tenant, 'completed', 'm', NULL, "
                "NULL, NULL, NULL, NULL, now(), :hold, :charge, NULL, NULL)::tollgate_ended)"
            ),
            {"id": task_id, "tenant": tenant_id, "hold": KREA_MEDIUM, "charge": KREA_MEDIUM},
        )
        assert settled.scalar_one() is False
        inside = await conn.execute(
            text("SELECT balance_micros, held_micros FROM tenants WHERE id = :id"),
            {"id": tenant_id},
        )
        assert tuple(inside.one()) == after_first
        await trans.rollback()
    assert await totals(engine, tenant_id) == after_first
    async with engine.begin() as conn:
        assert await lifecycle.fail(conn, task_id, 0, "late", "too late") is None
    assert len(await entries(engine, task_id)) == 2
    await assert_ledger_clean(engine)


# ---------------------------------------------------------------- crashes


class Crash(BaseException):
    """The worker process dies here: no ``except Exception`` runs, no commit happens."""


async def _crash_before_the_end(*args: Any, **kwargs: Any) -> bool:
    raise Crash


@contextlib.asynccontextmanager
async def settling_fails(engine: AsyncEngine, task_id: str) -> AsyncIterator[None]:
    """The task's settlement fails once its ledger row is written, inside the ending call's
    transaction (a trigger on the ledger, for this task only)."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION crash_settling() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF NEW.task_id = '{task_id}' THEN RAISE EXCEPTION 'killed'; END IF; "
                "RETURN NEW; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER crash_settling AFTER INSERT ON ledger_entries FOR EACH ROW "
                "WHEN (NEW.kind IN ('capture', 'release')) EXECUTE FUNCTION crash_settling()"
            )
        )
    try:
        yield
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER crash_settling ON ledger_entries"))
            await conn.execute(text("DROP FUNCTION crash_settling"))


CAPTURE_CRASHES = ["before-the-end", "after-the-capture-row-before-the-task-is-final"]


async def settlement_rows(engine: AsyncEngine, task_id: str) -> list[str]:
    return [kind for kind, *_ in await entries(engine, task_id) if kind != "hold"]


async def next_attempt(engine: AsyncEngine, settings: Settings, task_id: str) -> int:
    """What the reconciler does once the dead worker's lease runs out."""
    await asyncio.sleep(settings.lease_seconds + 0.2)
    async with engine.begin() as conn:
        reclaimed = dict(await lifecycle.reclaim_expired_leases(conn, BATCH))
    assert task_id in reclaimed
    return reclaimed[task_id]


@pytest.mark.parametrize("point", CAPTURE_CRASHES, ids=CAPTURE_CRASHES)
async def test_a_worker_killed_during_capture_leaves_no_capture_and_the_next_attempt_captures_once(
    client: Client,
    settings: Settings,
    engine: AsyncEngine,
    deps: WorkerDeps,
    simulator: Sim,
    monkeypatch: pytest.MonkeyPatch,
    point: str,
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    task_id = (await submit(client, key, {"model": "krea-2-medium", "prompt": point}))["id"]
    if point == "before-the-end":
        with monkeypatch.context() as patched:
            patched.setattr(lifecycle, "complete", _crash_before_the_end)
            with pytest.raises(Crash):
                await generate_task({"deps": deps}, task_id, 0)
    else:
        async with settling_fails(engine, task_id):
            with pytest.raises(asyncpg.RaiseError):
                await generate_task({"deps": deps}, task_id, 0)

    assert await settlement_rows(engine, task_id) == []
    status, attempt, charged, _, images, _ = await task_row(engine, task_id)
    assert (status, attempt, charged, images) == ("processing", 0, None, None)
    assert await totals(engine, tenant_id) == (START, KREA_MEDIUM)
    await assert_ledger_clean(engine)

    attempt = await next_attempt(engine, settings, task_id)
    assert attempt == 1
    assert (await generate_task({"deps": deps}, task_id, attempt)).startswith("completed")
    assert (await generate_task({"deps": deps}, task_id, 0)).startswith("skipped")
    assert await entries(engine, task_id) == [
        ("hold", KREA_MEDIUM, None),
        ("capture", KREA_MEDIUM, KREA_MEDIUM),
    ]
    assert await totals(engine, tenant_id) == (START - KREA_MEDIUM, 0)
    assert (await simulator.stats())["submits"] == 1  # the new attempt resumed the upstream job
    await assert_ledger_clean(engine)


async def test_a_worker_killed_during_release_leaves_no_release_and_the_next_attempt_releases_once(
    client: Client,
    settings: Settings,
    engine: AsyncEngine,
    deps: WorkerDeps,
    simulator: Sim,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await simulator.configure(error_kind="job_failed")
    tenant_id, key = await make_tenant_key(settings)
    task_id = (await submit(client, key, {"model": "krea-2-medium", "prompt": "release"}))["id"]
    async with settling_fails(engine, task_id):
        with pytest.raises(asyncpg.RaiseError):
            await generate_task({"deps": deps}, task_id, 0)

    assert await settlement_rows(engine, task_id) == []
    status, _, charged, _, _, code = await task_row(engine, task_id)
    assert (status, charged, code) == ("processing", None, None)
    assert await totals(engine, tenant_id) == (START, KREA_MEDIUM)

    attempt = await next_attempt(engine, settings, task_id)
    assert (await generate_task({"deps": deps}, task_id, attempt)).startswith("failed")
    assert await entries(engine, task_id) == [
        ("hold", KREA_MEDIUM, None),
        ("release", KREA_MEDIUM, KREA_MEDIUM),
    ]
    assert await totals(engine, tenant_id) == (START, 0)
    status, _, charged, _, _, code = await task_row(engine, task_id)
    assert (status, charged, code) == ("failed", 0, "generation_failed")
    await assert_ledger_clean(engine)


async def test_a_sweeper_killed_mid_release_releases_once_on_its_next_tick(
    client: Client,
    settings: Settings,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    task_id = (await submit(client, key, {"model": "krea-2-medium", "prompt": "sweep"}))["id"]
    await backdate(engine, task_id)
    async with settling_fails(engine, task_id):
        with pytest.raises(DBAPIError):
            async with engine.begin() as conn:
                await lifecycle.fail_overdue(conn, 1800, BATCH)
    assert await settlement_rows(engine, task_id) == []
    status, attempt, _, _, _, _ = await task_row(engine, task_id)
    assert (status, attempt) == ("pending", 0)
    assert await totals(engine, tenant_id) == (START, KREA_MEDIUM)

    async with engine.begin() as conn:
        assert task_id in await lifecycle.fail_overdue(conn, 1800, BATCH)
    assert await settlement_rows(engine, task_id) == ["release"]
    assert await totals(engine, tenant_id) == (START, 0)
    await assert_ledger_clean(engine)
