"""Which exceptions mean "a dependency is down" (503) and which are bugs (500):
``gateway.responses.is_unavailable``, on errors raised by the real clients."""

import asyncpg
import pytest
import redis.asyncio
import redis.exceptions
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.servers import free_port
from gateway.responses import is_unavailable


async def raised(coro: object) -> BaseException:
    try:
        await coro  # type: ignore[misc]
    except BaseException as exc:
        return exc
    raise AssertionError("no exception")


@pytest.mark.asyncio
async def test_a_missing_socket_and_a_refused_port_are_unavailable() -> None:
    gone = await raised(asyncpg.connect(host="/nonexistent-socket-dir", user="postgres"))
    assert isinstance(gone, OSError)
    assert is_unavailable(gone)
    refused = await raised(asyncpg.connect(host="127.0.0.1", port=free_port(), user="postgres"))
    assert is_unavailable(refused)


@pytest.mark.asyncio
async def test_sqlalchemy_wrapping_a_refused_connection_is_unavailable() -> None:
    engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x")

    async def connect() -> None:
        async with engine.connect():
            pass

    try:
        found = await raised(connect())
    finally:
        await engine.dispose()
    assert is_unavailable(found), repr(found)


@pytest.mark.asyncio
async def test_redis_refused_is_unavailable() -> None:
    client = redis.asyncio.Redis(port=free_port())
    try:
        found = await raised(client.ping())
    finally:
        await client.aclose()
    assert isinstance(found, redis.exceptions.ConnectionError)
    assert is_unavailable(found)


def test_server_states_and_pool_timeouts_are_unavailable() -> None:
    assert is_unavailable(asyncpg.exceptions.CannotConnectNowError("starting up"))
    assert is_unavailable(asyncpg.exceptions.AdminShutdownError("terminating"))
    assert is_unavailable(asyncpg.exceptions.TooManyConnectionsError("too many"))
    assert is_unavailable(PoolTimeout("QueuePool limit reached"))


def test_bugs_and_bad_input_are_not() -> None:
    assert not is_unavailable(ValueError("bad"))
    assert not is_unavailable(FileNotFoundError("a file of ours"))  # not raised in a client
    assert not is_unavailable(asyncpg.exceptions.UniqueViolationError("dup"))
    assert not is_unavailable(asyncpg.DataError("invalid input for query argument"))
    assert not is_unavailable(redis.exceptions.ResponseError("WRONGTYPE"))
