"""Outages of Redis and PostgreSQL: a worker process waits them out, never dies of one.

Rules (docs/operations.md, "Outages"):

- **Log once.** ``Health`` records each dependency's state. The first failure
  of an outage logs one warning and sets ``tollgate_dependency_up`` to 0; its
  end logs one line with how long it lasted and sets the gauge back to 1.
  Attempts in between log nothing.
- **Redis.** ``ResilientWorker`` (``workers/resilient.py``) is arq's worker
  with a poll loop that catches a lost connection, backs off (``BACKOFF_MIN``
  doubling to ``BACKOFF_MAX``) and tries again; redis-py reconnects on the
  next command. A job whose own Redis call fails is run again by arq later
  (``retry_on_outage``). A job that ends during the outage, unable to record
  its end, ends quietly: arq would raise its error out of the poll loop, one
  failed poll (one back-off) per such job once Redis is back. Closing with
  Redis gone still runs the shutdown hooks.
- **PostgreSQL.** A job that cannot reach it marks it down and is run again
  after ``JOB_RETRY_SECONDS``; while it is down the worker picks no new jobs
  (they would only fail) and a probe (``watch_database``) asks every
  ``BACKOFF_MAX`` seconds at most; its answer resumes the poll loop at once.
  A task whose run stopped mid-way keeps its lease until it runs out, then the
  reconciler hands it to a new attempt (``workers/lease.py``).
- **Wake-ups.** The poll loop sleeps ``poll_delay`` or until a message on the
  queue's wake channel (``gateway/redis_keys.queue_wake_channel``), which the
  enqueue and the slot hand-off publish: a new job starts within milliseconds,
  not a poll interval. A job is started by one script (``_START_JOB``,
  ``workers/resilient.py``) where arq spends four round trips on it.
"""

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq.worker import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import metrics

logger = logging.getLogger("tollgate.worker")

REDIS = "redis"
POSTGRES = "postgres"
DEPENDENCIES = (REDIS, POSTGRES)
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
# A job that met an outage runs again this long after (arq's Retry).
JOB_RETRY_SECONDS = 1.0
# How often an idle worker checks PostgreSQL while it is up (for the gauge).
PROBE_UP_SECONDS = 5.0

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


def is_redis_outage(exc: BaseException) -> bool:
    return isinstance(exc, REDIS_ERRORS)


def is_database_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says PostgreSQL cannot be reached (not a bad statement)."""
    import asyncpg

    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None or isinstance(seen, RedisError):
            # Redis's connection errors wrap an OSError too: that one is Redis's outage.
            return False
        if isinstance(seen, DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(
            seen,
            (
                OSError,
                asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError,
                asyncpg.CannotConnectNowError,
                asyncpg.exceptions.AdminShutdownError,
                asyncpg.exceptions.CrashShutdownError,
            ),
        ):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__ or seen.__context__
    return False


class Health:
    """Each dependency's state as this process last found it; logs and gauges changes."""

    def __init__(self, component: str) -> None:
        self.component = component
        self._down_since: dict[str, float] = {}
        self.changed = asyncio.Event()  # set when a dependency comes back
        self.went_down = asyncio.Event()  # set when one goes
        for dependency in DEPENDENCIES:
            metrics.dependency_up(dependency, True)

    def is_up(self, dependency: str) -> bool:
        return dependency not in self._down_since

    def down(self, dependency: str, exc: BaseException) -> None:
        if dependency in self._down_since:
            return
        self._down_since[dependency] = time.monotonic()
        self.went_down.set()
        metrics.dependency_up(dependency, False)
        logger.warning(
            "%s: %s unavailable (%s: %s); waiting for it, retrying with back-off",
            self.component,
            dependency,
            type(exc).__name__,
            str(exc)[:200],
        )

    def up(self, dependency: str) -> None:
        since = self._down_since.pop(dependency, None)
        if since is None:
            return
        metrics.dependency_up(dependency, True)
        self.changed.set()
        logger.warning(
            "%s: %s is back after %.1f s; resuming",
            self.component,
            dependency,
            time.monotonic() - since,
        )


def retry_on_outage(health: Health, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """An arq job that, meeting an outage of Redis or PostgreSQL, is run again later."""

    @functools.wraps(fn)
    async def job(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(ctx, *args, **kwargs)
        except Retry:
            raise
        except Exception as exc:
            if is_database_outage(exc):
                health.down(POSTGRES, exc)
            elif is_redis_outage(exc):
                health.down(REDIS, exc)
            else:
                raise
            raise Retry(defer=JOB_RETRY_SECONDS) from exc

    return job


async def _database_answers(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def wait_for_database(engine: AsyncEngine, health: Health) -> None:
    """Return once PostgreSQL answers (at start-up), backing off in between."""
    backoff = BACKOFF_MIN
    while True:
        try:
            await _database_answers(engine)
        except Exception as exc:
            if not is_database_outage(exc):
                raise
            health.down(POSTGRES, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
        else:
            health.up(POSTGRES)
            return


async def wait_set(event: asyncio.Event, seconds: float) -> None:
    """Wait until ``event`` is set, ``seconds`` at most. Not ``asyncio.wait_for``: on
    Python 3.11 it drops a cancellation that comes as the event is set, and a worker told
    to stop would go on polling."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


async def watch_database(engine: AsyncEngine, health: Health) -> None:
    """Probe PostgreSQL: every ``PROBE_UP_SECONDS`` while up, with back-off while down."""
    backoff = BACKOFF_MIN
    while True:
        try:
            await _database_answers(engine)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_database_outage(exc):
                health.down(POSTGRES, exc)
            else:
                logger.warning("database probe failed: %s", exc)
        else:
            health.up(POSTGRES)
        if health.is_up(POSTGRES):
            backoff = BACKOFF_MIN
            health.went_down.clear()
            # A job that meets the outage wakes the probe at once.
            await wait_set(health.went_down, PROBE_UP_SECONDS)
        else:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
