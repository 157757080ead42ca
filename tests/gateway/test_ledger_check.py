"""``tollgate ledger check`` finds tampering, and the database refuses to rewrite history.

Tampering happens in a scratch database of its own, created and migrated here
and dropped afterwards: other tests run ``ledger check`` against the shared one.
"""

import asyncio
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import ROOT, SERVER_URL, _plain, bearer, make_settings, make_tenant_key, run_cli
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import create_app
from gateway.db import create_engine
from gateway.ledger import service as ledger
from gateway.settings import Settings
from gateway.tasks import lifecycle

KREA_MEDIUM = 30_000


async def _on_server(sql: str) -> None:
    conn = await asyncpg.connect(_plain(SERVER_URL))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def scratch(tmp_path: Path) -> AsyncIterator[Settings]:
    """Settings for a fresh database migrated with ``alembic upgrade head``, dropped after."""
    name = f"tollgate_scratch_{os.getpid()}_{secrets.token_hex(3)}"
    await _on_server(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(SERVER_URL).set(drivername="postgresql+asyncpg", database=name)
        rendered = url.render_as_string(hide_password=False)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "alembic",
            "upgrade",
            "head",
            cwd=ROOT,
            env={**os.environ, "TOLLGATE_DATABASE_URL": rendered},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        # No upstream is called here: the simulator URL only has to be well formed.
        settings = make_settings(rendered, "http://127.0.0.1:9", tmp_path / "storage")
        yield settings
    finally:
        await _on_server(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def engine(scratch: Settings) -> AsyncIterator[AsyncEngine]:
    built = create_engine(scratch)
    yield built
    await built.dispose()


async def completed_task(settings: Settings, engine: AsyncEngine, key: str) -> str:
    """A krea-2-medium task submitted over HTTP and completed: a hold and its capture."""
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        response = await c.post(
            "/v1/images/generations",
            json={"model": "krea-2-medium", "prompt": "evidence"},
            headers=bearer(key),
        )
        assert response.status_code == 200, response.text
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.delete(settings.queue_name)
    finally:
        await redis.aclose()
    task_id = str(response.json()["id"])
    async with engine.begin() as conn:
        assert await lifecycle.claim(conn, task_id, 0, 30) is not None
        assert await lifecycle.complete(conn, task_id, 0, [f"{task_id}/0.png"], 3600)
    return task_id


async def problems(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return await ledger.check(conn)


async def ledger_check_cli(settings: Settings) -> tuple[int, str, str]:
    return await run_cli(settings, "ledger", "check")


def titled(found: list[str], title: str, subject: str) -> list[str]:
    return [p for p in found if p.startswith(title) and subject in p]


async def test_a_tampered_balance_is_found_and_the_cli_exits_1(
    scratch: Settings, engine: AsyncEngine
) -> None:
    tenant_id, key = await make_tenant_key(scratch)
    await completed_task(scratch, engine, key)
    assert await problems(engine) == []
    code, out, err = await ledger_check_cli(scratch)
    assert code == 0, err
    assert "ledger ok" in out

    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE tenants SET balance_micros = balance_micros + 1 WHERE id = :id"),
            {"id": tenant_id},
        )
    found = await problems(engine)
    assert titled(found, "balance differs from its ledger", tenant_id)
    code, out, err = await ledger_check_cli(scratch)
    assert code == 1
    assert "ledger ok" not in out
    assert "balance differs from its ledger" in err
    assert tenant_id in err
    assert "ledger problem(s)" in err


async def test_a_second_settlement_of_one_hold_is_found_and_the_cli_exits_1(
    scratch: Settings, engine: AsyncEngine
) -> None:
    _, key = await make_tenant_key(scratch)
    task_id = await completed_task(scratch, engine, key)
    assert await problems(engine) == []
    async with engine.begin() as conn:
        # A release beside the capture, under a key of its own so UNIQUE lets it in.
        await conn.execute(
            text(
                "INSERT INTO ledger_entries (tenant_id, task_id, kind, amount_micros, "
                "hold_micros, idempotency_key, reason, created_at) "
                "SELECT tenant_id, id, 'release', :hold, :hold, :key, 'tampered', now() "
                "FROM tasks WHERE id = :id"
            ),
            {"id": task_id, "hold": KREA_MEDIUM, "key": f"tamper:{uuid.uuid4()}"},
        )
    found = await problems(engine)
    assert titled(found, "a hold settled more than once", task_id)
    code, _, err = await ledger_check_cli(scratch)
    assert code == 1
    assert "a hold settled more than once" in err
    assert task_id in err


async def test_a_settlement_with_the_holds_own_key_is_refused(
    scratch: Settings, engine: AsyncEngine
) -> None:
    _, key = await make_tenant_key(scratch)
    task_id = await completed_task(scratch, engine, key)
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO ledger_entries (tenant_id, task_id, kind, amount_micros, "
                    "hold_micros, idempotency_key, reason, created_at) "
                    "SELECT tenant_id, id, 'release', :hold, :hold, :key, '', now() "
                    "FROM tasks WHERE id = :id"
                ),
                {"id": task_id, "hold": KREA_MEDIUM, "key": ledger.settle_key(task_id)},
            )
    assert await problems(engine) == []


HISTORY_REWRITES = (
    "UPDATE ledger_entries SET amount_micros = amount_micros + 1",
    "UPDATE ledger_entries SET reason = 'rewritten' WHERE kind = 'topup'",
    "DELETE FROM ledger_entries",
    "DELETE FROM ledger_entries WHERE kind = 'capture'",
    "TRUNCATE ledger_entries",
)


async def test_the_database_refuses_to_update_or_delete_ledger_rows(
    scratch: Settings, engine: AsyncEngine
) -> None:
    _, key = await make_tenant_key(scratch)
    await completed_task(scratch, engine, key)
    before = await _entries(engine)
    for statement in HISTORY_REWRITES:
        with pytest.raises(DBAPIError, match="append-only"):
            async with engine.begin() as conn:
                await conn.execute(text(statement))
    assert await _entries(engine) == before
    assert await problems(engine) == []


async def test_the_database_refuses_totals_that_would_spend_credits_twice(
    scratch: Settings, engine: AsyncEngine
) -> None:
    tenant_id, _ = await make_tenant_key(scratch, credits_micros=1_000)
    for values in ("held_micros = balance_micros + 1", "held_micros = -1", "balance_micros = -5"):
        with pytest.raises(IntegrityError, match="ck_tenants"):
            async with engine.begin() as conn:
                await conn.execute(
                    text(f"UPDATE tenants SET {values} WHERE id = :id"), {"id": tenant_id}
                )
    assert await problems(engine) == []


async def _entries(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list(
            await conn.execute(text("SELECT id, kind, amount_micros, reason FROM ledger_entries"))
        )
