"""PostgreSQL access: the engine, sessions, and the migration check.

The request scope owns the transaction (see ``app.py``): services take the
session as their first argument and never commit. The app refuses to start on
a database whose schema is not at the migrations' head.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway import crypto
from gateway.errors import NotFound
from gateway.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class DatabaseNotReady(RuntimeError):
    """The database is unreachable or not migrated; the message says what to run."""


def utcnow() -> datetime:
    return datetime.now(UTC)


Row = TypeVar("Row")


async def get_or_404(session: AsyncSession, model: type[Row], key: str, missing: str) -> Row:
    """The ``model`` row whose primary key is ``key``; NotFound with ``missing`` if none."""
    row: Any = await session.get(model, key)
    if row is None:
        raise NotFound(missing)
    found: Row = row
    return found


def create_engine(settings: Settings) -> AsyncEngine:
    engine = create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=False,
        # Errors never quote statement parameters: they can hold keys, prompts, URLs.
        hide_parameters=True,
    )
    # Sealed columns (webhook secrets, upstream keys) find their keys here (gateway/crypto.py).
    crypto.attach(engine.sync_engine.dialect, crypto.Keyring.parse(settings.encryption_keys))
    return engine


async def _init_hot_connection(conn: asyncpg.Connection) -> None:
    # JSONB in and out as Python values, as SQLAlchemy's JSONB type does.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Nothing to reset: the hot paths never change session state (no SET, LISTEN, cursor
    or advisory lock). asyncpg's default reset would cost a round trip per release; it
    still rolls back a transaction left open before calling this."""


async def create_hot_pool(settings: Settings) -> asyncpg.Pool:
    """asyncpg's own pool for the hot paths (submit, task read): no ORM, no session, and
    every statement prepared once per connection. Up to ``db_pool_size`` connections,
    beside the engine's, opened on first use: the gateway starts (and ``/readyz`` says
    what is wrong) while PostgreSQL is unreachable."""
    url = make_url(settings.database_url).set(drivername="postgresql")
    return await asyncpg.create_pool(
        url.render_as_string(hide_password=False),
        min_size=0,
        max_size=settings.db_pool_size,
        init=_init_hot_connection,
        reset=_no_session_reset,
    )


async def close_hot_pool(pool: asyncpg.Pool, grace_seconds: float = 5.0) -> None:
    """Close gracefully (connections in use are waited for), then by force: a request
    still holding a connection at shutdown must not leave it open."""
    try:
        await asyncio.wait_for(pool.close(), grace_seconds)
    except asyncio.CancelledError:
        pool.terminate()
        raise
    except Exception:  # the wait ran out, or a connection failed to close
        pool.terminate()


async def driver_of(conn: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a SQLAlchemy one, for a statement sent as it is (no
    BEGIN is sent for it; under autocommit it is its own transaction)."""
    raw = await conn.get_raw_connection()
    driver: asyncpg.Connection = raw.driver_connection
    return driver


class Statements:
    """Single statements, each its own transaction (autocommit): one round trip apiece,
    prepared once per connection, nothing of the ORM.

    Over the hot asyncpg pool when there is one (``pool``); else over a connection of
    ``engine``, used as plain asyncpg (no BEGIN is sent, so its return to the pool sends
    no ROLLBACK either). Parameters are numbered (``$1``); JSONB goes in as text, cast
    in the statement, since the two kinds of connection encode JSONB differently (both
    decode it to Python values).
    """

    __slots__ = ("engine", "pool")

    def __init__(self, engine: AsyncEngine, pool: asyncpg.Pool | None = None) -> None:
        self.engine = engine
        self.pool = pool

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        if self.pool is not None:
            rows: list[Any] = await self.pool.fetch(sql, *args)
            return rows
        async with self.engine.connect() as conn:
            return list(await (await driver_of(conn)).fetch(sql, *args))


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


@asynccontextmanager
async def transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One unit of work outside a request (CLI, worker): commit on success, roll back on error."""
    async with sessions() as session, session.begin():
        yield session


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migration_head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def known_revisions() -> frozenset[str]:
    scripts = ScriptDirectory.from_config(alembic_config())
    return frozenset(rev.revision for rev in scripts.walk_revisions())


async def check_migrated(engine: AsyncEngine) -> None:
    """Raise DatabaseNotReady unless the schema is at the migrations' head, or newer.

    Newer means a revision this code does not know: a rolling upgrade has run
    the next release's migrations while this process still serves. Migrations
    only add (docs/operations.md), so the old code keeps working on the new
    schema, and refusing it would take every old process out at once.
    """
    head = migration_head()
    try:
        async with engine.connect() as conn:
            current = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    except ProgrammingError:
        current = None
    except (OSError, DBAPIError) as exc:
        raise DatabaseNotReady(f"cannot reach PostgreSQL: {exc}") from None
    if current != head and (current is None or current in known_revisions()):
        state = f"at revision {current}" if current else "not migrated"
        raise DatabaseNotReady(
            f"the database is {state}, the code needs revision {head}: "
            "run `tollgate migrate` (alembic upgrade head) first"
        )
