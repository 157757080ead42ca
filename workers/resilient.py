"""``ResilientWorker``: arq's worker keeping the rules of ``workers/outage.py`` (it waits
out Redis and PostgreSQL outages; a new job wakes its poll loop), and running a job in
fewer round trips than arq: one script starts it (``_START_JOB``), and a job that ran to
its end is finished with its run's end (``finish_job``, ``workers/run_end.py``)."""

import asyncio
import contextlib
import logging
from typing import Any

from arq.connections import ArqRedis, create_pool, log_redis_info
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker

from workers.outage import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    POSTGRES,
    REDIS,
    REDIS_ERRORS,
    Health,
    wait_set,
)
from workers.run_end import RunEnd, finish_with_run_end, record_run_end

logger = logging.getLogger("tollgate.worker")

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
        await self._stop_main()
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

    async def _stop_main(self) -> None:
        """Stop the poll loop and wait for it to end before the pool closes. arq's close only
        cancels it: closed as it starts (``async_run``, no signal handlers), the start-up
        would still be closing what it opened, on a pool closed under it, and a connection
        it takes meanwhile would be opened anew and never closed."""
        main = self.main_task
        if main is None or main.done() or main is asyncio.current_task():
            return
        main.cancel()
        await asyncio.wait([main])

    async def _finish_close(self) -> None:
        """The rest of arq's ``close`` after its gather of the cancelled jobs."""
        if self._pool is None:
            return
        await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.close(close_connection_pool=True)
        self._pool = None
