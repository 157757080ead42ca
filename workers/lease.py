"""The task lease: a claimed task stays this run's while it beats, until its deadline.

- **Claim.** ``lifecycle.claim`` gives the run a lease of ``lease_seconds`` for
  its ``attempt``; every write the run makes names that attempt
  (``gateway/tasks/lifecycle.py``).
- **Beats.** The run renews the lease when it records its channel, on
  progress, while it sleeps, and beside an upstream call that may outlast a
  lease (``kept_alive``): at most every third of a lease, for few writes and
  two chances before it runs out. Each renewal renews the run's upstream slot
  too (``Admission.renew_slot``), so a killed worker's slot frees itself within
  a lease.
- **Lost.** A write that finds the lease gone raises ``LeaseLost``: another
  attempt owns the task now (or it was cancelled), and the run stops without
  writing anything more.
- **Outages.** A heartbeat that cannot reach PostgreSQL is skipped while the
  last renewal still covers two thirds of a lease; past that the run stops as
  if the lease were lost, since another attempt may own the task by the time
  the database is back. Never is a lease claimed that could not be renewed.
- **Deadline.** ``task_deadline_seconds`` counted from the task's submission,
  not its claim. ``check_deadline`` raises ``DeadlineExceeded`` past it, and
  every wait (``sleep``) ends by it.
- **Hand-back.** A run cancelled at shutdown ends its lease at once
  (``hand_back``) so another worker need not wait it out. So does a run stopped
  by an outage, as soon as PostgreSQL answers (``hand_back_after_outage``): arq
  runs its job again a second later, and that run's claim would otherwise find
  the lease live and leave the task, and its upstream slot, idle until the
  lease ran out.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime

from gateway.db import utcnow
from gateway.tasks import lifecycle
from workers.admission import Admission
from workers.deps import WorkerDeps
from workers.outage import is_database_outage

logger = logging.getLogger("tollgate.generate")

# A run stopped by an outage asks to hand its task back at these pauses, doubling.
HAND_BACK_RETRY_MIN = 0.05
HAND_BACK_RETRY_MAX = 1.0


class LeaseLost(Exception):
    """Another attempt owns the task now; this run stops without writing."""


class DeadlineExceeded(Exception):
    pass


class Lease:
    """One run's lease on its claimed task, and the task's deadline."""

    def __init__(self, deps: WorkerDeps, task_id: str, attempt: int, admission: Admission) -> None:
        self._db = deps.statements  # each write one autocommit statement
        self._settings = deps.settings
        self.task_id = task_id
        self.attempt = attempt
        self._admission = admission
        self.deadline = 0.0  # monotonic; set once the task is claimed
        self._last_beat = 0.0
        # The channel the claim recorded (no upstream job yet): its first submit needs no
        # record of its own (``route_recorded``).
        self.claimed_route: str | None = None

    def start(self, created_at: datetime) -> None:
        """The task was just claimed (submitted at ``created_at``): the lease is fresh."""
        self._last_beat = time.monotonic()
        age = (utcnow() - created_at).total_seconds()
        self.deadline = time.monotonic() + self._settings.task_deadline_seconds - age

    def check_deadline(self) -> float:
        """Seconds left before the deadline; ``DeadlineExceeded`` when none are."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded
        return remaining

    def route_recorded(self, channel_id: str) -> bool:
        """Whether the claim recorded ``channel_id`` and nothing was sent since: true once.
        The claim was then the fence a submit needs (the task still this attempt's), with
        no network call between them but the run's liveness record."""
        recorded, self.claimed_route = self.claimed_route, None
        return recorded == channel_id

    async def record_route(
        self, channel_id: str, job_id: str | None, *, can_cancel: bool, progress: int | None = None
    ) -> None:
        """Record the channel and upstream job the task runs on (None: none), renewing."""
        alive = await lifecycle.record_route(
            self._db,
            self.task_id,
            self.attempt,
            self._settings.lease_seconds,
            channel_id=channel_id,
            upstream_job_id=job_id,
            can_cancel=can_cancel,
            progress=progress,
        )
        await self._renewed(alive)

    async def beat(self, *, progress: int | None = None) -> None:
        """Renew the lease (and the slot), recording ``progress`` if given.

        PostgreSQL out of reach: the run goes on while its last renewal still covers
        two thirds of a lease, then stops as if the lease were lost (it may be, by the
        time the database is back: the reconciler hands such a task on).
        """
        try:
            alive = await lifecycle.heartbeat(
                self._db,
                self.task_id,
                self.attempt,
                self._settings.lease_seconds,
                progress=progress,
            )
        except Exception as exc:
            if not is_database_outage(exc):
                raise
            if time.monotonic() - self._last_beat < self._settings.lease_seconds * 2 / 3:
                logger.debug("task %s: lease not renewed (database unavailable)", self.task_id)
                return
            raise LeaseLost from exc
        await self._renewed(alive)

    async def _renewed(self, alive: bool) -> None:
        if not alive:
            raise LeaseLost
        await self._admission.renew_slot()
        self._last_beat = time.monotonic()

    async def maybe_beat(self, progress: int | None) -> None:
        """Beat if a third of a lease has passed since the last renewal."""
        # Few writes, and two chances before the lease runs out.
        if time.monotonic() - self._last_beat >= self._settings.lease_seconds / 3:
            await self.beat(progress=progress)

    @contextlib.asynccontextmanager
    async def kept_alive(self) -> AsyncIterator[None]:
        """Renew the lease in the background while the block runs (a long upstream call).

        A lost lease ends the renewing; the run's next write finds it lost. Most calls
        end well within a third of a lease: the renewing task is only started by a timer
        then, so a short call costs a timer, not a task.
        """
        loop = asyncio.get_running_loop()
        keep_alive: asyncio.Task[None] | None = None

        def start() -> None:
            nonlocal keep_alive
            keep_alive = loop.create_task(self._keep_alive())

        timer = loop.call_later(self._settings.lease_seconds / 3, start)
        try:
            yield
        finally:
            timer.cancel()
            if keep_alive is not None:
                keep_alive.cancel()
                with contextlib.suppress(asyncio.CancelledError, LeaseLost):
                    await keep_alive

    async def _keep_alive(self) -> None:
        while True:
            await self.maybe_beat(None)
            await asyncio.sleep(self._settings.lease_seconds / 3)

    async def sleep(self, seconds: float) -> None:
        """Sleep, keeping the lease alive, and give up at the deadline."""
        end = time.monotonic() + min(seconds, self.check_deadline())
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self._settings.lease_seconds / 3))
            await self.maybe_beat(None)
        self.check_deadline()

    async def hand_back_after_outage(self) -> None:
        """End the lease of a run an outage stopped, once PostgreSQL answers, so the job's
        next run claims the task at once and resumes its upstream job. Asks with back-off
        while the lease is still this run's; past that it runs out by itself."""
        if not self.deadline:
            return  # nothing claimed
        until = self._last_beat + self._settings.lease_seconds
        pause = HAND_BACK_RETRY_MIN
        while True:
            try:
                await lifecycle.hand_back(self._db, self.task_id, self.attempt)
                return
            except Exception as exc:
                if not is_database_outage(exc):
                    logger.warning("task %s: could not hand the task back: %s", self.task_id, exc)
                    return
            if time.monotonic() + pause >= until:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, HAND_BACK_RETRY_MAX)

    async def hand_back(self) -> None:
        """End the lease now (shutdown): another worker may take the task at once."""
        try:
            handed = await lifecycle.hand_back(self._db, self.task_id, self.attempt)
        except Exception:
            # The lease runs out on its own; the reconciler then hands the task on.
            logger.exception("task %s: could not hand the task back", self.task_id)
            return
        if handed:
            logger.info("task %s: handed back at shutdown", self.task_id)
