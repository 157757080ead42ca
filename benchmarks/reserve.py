"""The reservation alone, at the database: the numbers behind ADR 0005.

``python -m benchmarks.reserve --database-url URL [--seconds S] [--connections C]`` makes a
database of its own (dropped at the end), and for one tenant and for 50 tenants measures
reservations per second with ``C`` connections submitting at once, two ways:

- ``transaction``: the shape before ADR 0005, as SQLAlchemy sent it: BEGIN; raise the
  in-flight count (the tenant row is locked from here); insert the task; hold the credits;
  insert the ledger row; add the key's spend; COMMIT: seven round trips, the last five with
  the tenant's row locked.
- ``function``: one call of ``tollgate_submit`` (migration 0007), the hot rows last.
- ``batch``: one call of ``tollgate_submit_batch`` (migration 0015, ADR 0007) for 16 of
  a tenant's submits, its hot rows written once; its rate counts submits, its latency
  is a call's.

Nothing but PostgreSQL runs: no HTTP, no Redis; Python only sends the statements.
"""

import argparse
import asyncio
import json
import secrets
import sys
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
from alembic import command
from sqlalchemy.engine import make_url

from gateway.db import alembic_config
from gateway.limits.service import spend_periods
from gateway.tasks.reservations import SUBMIT, SUBMIT_BATCH

AMOUNT = 3_277
FLUX_REQUEST = {"prompt": "a lighthouse at dawn", "size": "512x512"}
QUOTE = {"amount_micros": AMOUNT}

TRANSACTION = [
    "UPDATE tenants SET in_flight = in_flight + 1 WHERE id = $1",
    "INSERT INTO tasks (id, tenant_id, api_key_id, model, provider, status, progress, request, "
    "quote, billing_rule, user_group, credits_reserved_micros, estimated_seconds, can_cancel, "
    "api, attempt, created_at) VALUES ($1, $2, $3, 'flux-1-schnell', 'siliconflow', 'pending', "
    "0, $4::jsonb, $5::jsonb, 'per_megapixel_step', 'default', $6, 2, false, 'unified', 0, $7)",
    "UPDATE tenants SET held_micros = held_micros + $2 "
    "WHERE id = $1 AND balance_micros - held_micros >= $2",
    "INSERT INTO ledger_entries (tenant_id, task_id, kind, amount_micros, idempotency_key, "
    "reason, created_at) VALUES ($1, $2, 'hold', $3, $5, '', $4)",
    "INSERT INTO key_spend AS s (api_key_id, period, spent_micros) "
    "SELECT $1, p, $2 FROM unnest($3::text[]) AS p ON CONFLICT (api_key_id, period) "
    "DO UPDATE SET spent_micros = s.spent_micros + EXCLUDED.spent_micros",
]
BATCH = 16  # submits per call of the batch way


async def seed(conn: asyncpg.Connection, count: int) -> list[tuple[str, str]]:
    now = datetime.now(UTC)
    made = []
    for n in range(count):
        tenant, key = f"t_{secrets.token_hex(6)}", f"k_{secrets.token_hex(6)}"
        await conn.execute(
            "INSERT INTO tenants (id, name, user_group, balance_micros, held_micros, in_flight, "
            "webhook_secret, callback_schedule, created_at) "
            "VALUES ($1, $2, 'default', 0, 0, 0, $3, 'standard', $4)",
            tenant,
            f"reserve-{n}-{tenant}",
            "whsec_" + secrets.token_hex(16),
            now,
        )
        await conn.execute(
            "INSERT INTO ledger_entries (tenant_id, kind, amount_micros, idempotency_key, reason, "
            "created_at) VALUES ($1, 'topup', $2, $3, '', $4)",
            tenant,
            10**15,
            f"topup:{tenant}",
            now,
        )
        await conn.execute(
            "UPDATE tenants SET balance_micros = balance_micros + $2 WHERE id = $1", tenant, 10**15
        )
        await conn.execute(
            "INSERT INTO api_keys (id, tenant_id, key_hash, display_prefix, name, created_at) "
            "VALUES ($1, $2, $3, 'tg_x', 'reserve', $4)",
            key,
            tenant,
            secrets.token_hex(32),
            now,
        )
        made.append((tenant, key))
    return made


async def by_transaction(conn: asyncpg.Connection, tenant: str, key: str) -> int:
    task, now = f"task-{secrets.token_hex(10)}", datetime.now(UTC)
    async with conn.transaction():
        await conn.execute(TRANSACTION[0], tenant)
        await conn.execute(
            TRANSACTION[1], task, tenant, key, json.dumps(FLUX_REQUEST), json.dumps(QUOTE),
            AMOUNT, now,
        )  # fmt: skip
        status = await conn.execute(TRANSACTION[2], tenant, AMOUNT)
        if status != "UPDATE 1":
            raise RuntimeError("insufficient credits in the benchmark")
        await conn.execute(TRANSACTION[3], tenant, task, AMOUNT, now, f"hold:{task}")
        await conn.execute(TRANSACTION[4], key, AMOUNT, list(spend_periods(now)))
    return 1


async def by_function(conn: asyncpg.Connection, tenant: str, key: str) -> int:
    task, now = f"task-{secrets.token_hex(10)}", datetime.now(UTC)
    outcome = await conn.fetchval(
        SUBMIT, task, tenant, key, "flux-1-schnell", "siliconflow",
        json.dumps(FLUX_REQUEST), json.dumps(QUOTE), "per_megapixel_step", "default", AMOUNT,
        2, False, None, "unified", None, now, 0, list(spend_periods(now)),
        [None, None, None], None, None,
    )  # fmt: skip
    if outcome != "created":
        raise RuntimeError(outcome)
    return 1


async def by_batch(conn: asyncpg.Connection, tenant: str, key: str) -> int:
    tasks, now = [f"task-{secrets.token_hex(10)}" for _ in range(BATCH)], datetime.now(UTC)
    each = [[value] * BATCH for value in (
        key, "flux-1-schnell", "siliconflow", json.dumps(FLUX_REQUEST), json.dumps(QUOTE),
        "per_megapixel_step", "default", AMOUNT, 2, False, None, "unified", None, now, 0,
        list(spend_periods(now)), [None, None, None], None, None,
    )]  # fmt: skip
    outcomes = await conn.fetchval(SUBMIT_BATCH, tenant, tasks, *each)
    if set(outcomes) != {"created"}:
        raise RuntimeError(outcomes)
    return BATCH


async def measure(
    dsn: str, way: Any, pairs: list[tuple[str, str]], seconds: float, connections: int
) -> dict[str, float]:
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    latencies: list[float] = []  # one per call
    submits = 0
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        nonlocal submits
        i = n
        async with pool.acquire() as conn:
            while time.monotonic() < deadline:
                tenant, key = pairs[i % len(pairs)]
                i += 1
                started = time.perf_counter()
                submits += await way(conn, tenant, key)
                latencies.append(time.perf_counter() - started)

    began = time.monotonic()
    try:
        await asyncio.gather(*(client(n) for n in range(connections)))
    finally:
        await pool.close()
    elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "per_s": round(submits / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = make_url(args.database_url).set(drivername="postgresql")
    name = f"tollgate_reserve_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server.render_as_string(hide_password=False))
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = server.set(database=name).render_as_string(hide_password=False)
        migrate_url = server.set(drivername="postgresql+asyncpg", database=name)
        await asyncio.to_thread(
            command.upgrade,
            alembic_config(migrate_url.render_as_string(hide_password=False)),
            "head",
        )
        conn = await asyncpg.connect(url)
        try:
            pairs = await seed(conn, 50)
        finally:
            await conn.close()
        result: dict[str, Any] = {}
        for label, chosen in (("1_tenant", pairs[:1]), ("50_tenants", pairs)):
            ways = (("transaction", by_transaction), ("function", by_function), ("batch", by_batch))
            for way_name, way in ways:
                figures = await measure(url, way, chosen, args.seconds, args.connections)
                result[f"{way_name}_{label}"] = figures
                print(f"reserve: {way_name} {label}: {figures}", file=sys.stderr, flush=True)
        return result
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reserve")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
