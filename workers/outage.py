"""Outages of Redis and PostgreSQL: a worker process waits them out, never dies of one.

Rules (docs/operations.md, "Outages"):

- **Log once.** ``Health`` records each dependency's state. The first failure
  of an outage logs one warning and sets ``tollgate_dependency_up`` to 0; its
  end logs one line with how long it lasted and sets the gauge back to 1.
  Attempts in between log nothing.
- **Redis.** ``ResilientWorker`` is arq's worker with a poll loop that catches
  a lost connection, backs off (``BACKOFF_MIN`` doubling to ``BACKOFF_MAX``)
  and tries again; redis-py reconnects on the next command. A job whose own
  Redis call fails is run again by arq later (``retry_on_outage``). A job that
  ends during the outage, unable to record its end, ends quietly: arq would
  raise its error out of the poll loop, one failed poll (one back-off) per such
  job once Redis is back. Closing with Redis gone still runs the shutdown hooks.
- **PostgreSQL.** A job that cannot reach it marks it down and is run again
  after ``JOB_RETRY_SECONDS``; while it is down the worker picks no new jobs
  (they would only fail) and a probe (``watch_database``) asks every
  ``BACKOFF_MAX`` seconds at most; its answer resumes the poll loop at once.
  A task whose run stopped mid-way keeps its lease until it runs out, then the
  reconciler hands it to a new attempt (``workers/lease.py``).
- **Wake-ups.** The poll loop sleeps ``poll_delay`` or until a message on the
  queue's wake channel (``gateway/redis_keys.queue_wake_channel``), which the
  enqueue and the slot hand-off publish: a new job starts within milliseconds,
  not a poll interval. A job is started by one script (``_START_JOB``) where
  arq spends four round trips on it.
"""

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq.connections import ArqRedis, create_pool, log_redis_info
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Retry, Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import metrics
from workers.run_end import RunEnd, finish_with_run_end, record_run_end

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

# arq's job start in one round trip. KEYS: the job's in-progress key, the queue.
# ARGV: job id, now (ms), in-progress timeout (ms). Returns the job's score, or nil when
# the job runs elsewhere already, has finished, or is not due.
_START_JOB = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('PSETEX', KEYS[1], ARGV[3], '1')
return score
"""


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


class ResilientWorker(Worker):
    """arq's worker, surviving Redis and PostgreSQL outages (see the module's rules)."""

    def __init__(self, *args: Any, health: Health, wake_channel: str | None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.health = health
        self._wake_channel = wake_channel
        self._wake = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._backoff = BACKOFF_MIN
        self._start_script: Any = None
        # Runs' ends their jobs left to be written with arq's finish (``finish_job``).
        self._run_ends: dict[str, RunEnd] = {}
        self.ctx["run_ends"] = self._run_ends

    async def main(self) -> None:
        while self._pool is None:
            try:
                self._pool = await self._open_pool()
            except REDIS_ERRORS as exc:
                self.health.down(REDIS, exc)
                await self._back_off()
        self.health.up(REDIS)
        self._backoff = BACKOFF_MIN
        logger.info("worker for %s: %s", self.queue_name, ", ".join(self.functions))
        with contextlib.suppress(*REDIS_ERRORS):
            await log_redis_info(self.pool, logger.info)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        if self._wake_channel is not None:
            self._listener = asyncio.create_task(self._listen(self._wake_channel))
        while True:
            # Cleared before the queue is read: a wake-up during the read is not lost.
            self._wake.clear()
            await self._poll_iteration()
            await self._idle(self.poll_delay_s)

    async def _open_pool(self) -> ArqRedis:
        opening = asyncio.ensure_future(
            create_pool(
                self.redis_settings,
                retry=0,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        )
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Stopped while connecting (a worker closed as it starts): the pool being opened
            # is nobody's, so close it here, once open (within the connect timeout).
            await asyncio.wait([opening])
            if not opening.cancelled() and opening.exception() is None:
                await opening.result().close(close_connection_pool=True)
            raise

    async def _idle(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a wake-up message comes first."""
        if self._wake.is_set():
            return
        await wait_set(self._wake, seconds)

    async def _back_off(self) -> None:
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    async def _poll_iteration(self) -> None:
        try:
            if self.health.is_up(POSTGRES):
                await super()._poll_iteration()
            else:
                # Jobs would only fail: pick none until the probe finds PostgreSQL back.
                self.health.changed.clear()
                self._reap()
                await wait_set(self.health.changed, BACKOFF_MAX)
                return
        except REDIS_ERRORS as exc:
            self.health.down(REDIS, exc)
            await self._back_off()
            return
        self.health.up(REDIS)
        self._backoff = BACKOFF_MIN

    def _reap(self) -> None:
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                if not task.cancelled() and task.exception() is not None:
                    logger.warning("job %s ended with %r", job_id, task.exception())

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs`` with its WATCH / EXISTS / ZSCORE / MULTI-EXEC (four round
        trips per job) done by one script, and a lost connection uncounting the job."""
        if self._start_script is None:
            self._start_script = self.pool.register_script(_START_JOB)
        in_progress_ms = int(self.in_progress_timeout_s * 1000)
        for raw in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = raw.decode()
            try:
                score = await self._start_script(
                    keys=[in_progress_key_prefix + job_id, self.queue_name],
                    args=[job_id, timestamp_ms(), in_progress_ms],
                )
            except BaseException:
                self.job_counter -= 1
                self.sem.release()
                raise
            if score is None:
                # Started elsewhere, finished, or deferred again meanwhile.
                self.job_counter -= 1
                self.sem.release()
                continue
            task = self.loop.create_task(self._run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def _run_job(self, job_id: str, score: int) -> None:
        """arq's ``run_job``, but a job that could not record its end in Redis (it ended
        during an outage) ends quietly. arq's poll loop raises each finished job's error;
        taken for a failed poll, each would cost the loop a back-off after Redis is back
        (one second apiece for every job that ended during the outage). arq runs such a
        job again, once its in-progress key expires; the reconciler sooner."""
        try:
            await self.run_job(job_id, score)
        except REDIS_ERRORS as exc:
            self.health.down(REDIS, exc)
            logger.debug("job %s could not record its end: %s", job_id, exc)
        finally:
            end = self._run_ends.pop(job_id, None)
            if end is not None and self._pool is not None:  # stopped before arq's finish
                await record_run_end(self._pool, end)

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's finish; a job that ran to its end and left its run's end here
        (``workers/run_end.py``) is finished with it, in one round trip."""
        end = self._run_ends.pop(job_id, None)
        if end is not None and finish and not result_data and keep_in_progress is None:
            await finish_with_run_end(self.pool, job_id, end)
            return
        await super().finish_job(
            job_id,
            finish,
            result_data,
            result_timeout_s,
            keep_result_forever,
            incr_score,
            keep_in_progress,
        )
        if end is not None:
            await record_run_end(self.pool, end)

    async def _listen(self, channel: str) -> None:
        """Set the wake-up event on every message on ``channel``; reconnect when lost."""
        while True:
            pubsub = self.pool.pubsub()
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The poll loop notices the outage and logs it; only back off here.
                logger.debug("wake-up channel lost: %s", exc)
                await asyncio.sleep(BACKOFF_MAX)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        try:
            await super().close()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled ourselves
            # arq cancels the running jobs and gathers them: a job cancelled before its own
            # handler began (one just started, a cron tick) raises out of that gather.
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await self._finish_close()
        except REDIS_ERRORS as exc:
            logger.warning("closing with redis unavailable: %s", exc)
            if self.on_shutdown:
                try:
                    await self.on_shutdown(self.ctx)
                except Exception:
                    logger.exception("shutdown with redis unavailable")
            with contextlib.suppress(Exception):
                await self.pool.close(close_connection_pool=True)
            self._pool = None

    async def _finish_close(self) -> None:
        """The rest of arq's ``close`` after its gather of the cancelled jobs."""
        if self._pool is None:
            return
        await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.close(close_connection_pool=True)
        self._pool = None
