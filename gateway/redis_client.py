"""The Redis client of the request path (rate limits, queueing a submitted task).

redis-py's pool probes every connection it hands out with a zero-timeout socket read,
in case the last user left a reply unread; on the request path that probe cost more
than the Lua script it guards (docs/performance.md). It cannot find anything here:
redis-py drops a connection whose command was interrupted (timeout, cancellation,
error) instead of returning it to the pool, so a pooled connection has always read its
whole reply. This pool keeps the connect-if-needed and skips the probe.
"""

from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection


class _UnprobedPool(ConnectionPool):
    async def ensure_connection(self, connection: AbstractConnection) -> None:
        await connection.connect()  # type: ignore[no-untyped-call]


def request_path_redis(url: str, **options: Any) -> Redis:
    return Redis(connection_pool=_UnprobedPool.from_url(url, **options))
