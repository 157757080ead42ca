"""The reconcile tick's vacuum of the tables every submit updates (``workers/reconciler.py``,
step 5): whatever the server's autovacuum does (the CI machine's PostgreSQL runs without
it), the tenants' and the keys' spend rows do not pile up old versions."""

from conftest import free_port
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import create_engine
from gateway.settings import Settings
from workers.reconciler import HOT_TABLES, vacuum_hot_tables


async def _vacuums(engine: AsyncEngine) -> dict[str, int]:
    """How many times each hot table was vacuumed by hand (autovacuum's runs not counted)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT relname, vacuum_count FROM pg_stat_user_tables WHERE relname = ANY(:t)"),
            {"t": list(HOT_TABLES)},
        )
        return {name: int(count) for name, count in rows}


async def test_the_hot_tables_are_vacuumed(engine: AsyncEngine) -> None:
    before = await _vacuums(engine)
    assert set(before) == set(HOT_TABLES)

    assert await vacuum_hot_tables(engine) is True

    after = await _vacuums(engine)
    # at least ours (a worker's tick, were one running, could add its own)
    assert all(after[table] > before[table] for table in HOT_TABLES), (before, after)


async def test_a_database_that_cannot_be_reached_fails_the_vacuum_not_the_tick(
    settings: Settings,
) -> None:
    unreachable = settings.model_copy(
        update={"database_url": f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x"}
    )
    engine = create_engine(unreachable)
    try:
        assert await vacuum_hot_tables(engine) is False
    finally:
        await engine.dispose()
