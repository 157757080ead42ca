"""Which dependency an exception says is down (workers/outage.py)."""

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.servers import free_port
from workers.outage import is_database_outage, is_redis_outage

pytestmark = pytest.mark.asyncio


async def test_a_refused_redis_connection_is_redis_down_not_postgres() -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        with pytest.raises(RedisConnectionError) as caught:
            await redis.ping()
    finally:
        await redis.aclose()
    assert is_redis_outage(caught.value)
    # Its cause is an OSError (connection refused), which alone would say PostgreSQL.
    assert not is_database_outage(caught.value)


async def test_a_refused_postgres_connection_is_postgres_down() -> None:
    engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x")
    try:
        with pytest.raises((DBAPIError, OSError)) as caught:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert is_database_outage(caught.value)
