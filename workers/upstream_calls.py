"""One generation on one channel: submit (or resume), poll, fetch and store the results.

Every call to an upstream is timed and counted by channel, phase and outcome,
with the task's lease kept alive while it runs (a synchronous generation may
outlast a lease). A failure raises the adapter's ``UpstreamError``; what
follows from it (another channel, a pause, the task's end) is
``workers/failover.py``'s business.

- **No paying twice.** The channel and upstream job id are recorded as soon as
  the upstream gives one, so a re-run resumes polling that job instead of
  paying for a second generation; nothing is submitted past the deadline. A
  task cancelled (or taken over) while the upstream took its job has that job
  cancelled there, where the adapter can.
- **Polls.** A submitted job is paid for: its polls go on until the task's
  deadline. They are spent around the end the channel's recent jobs of the model
  suggest (``workers/job_clock.py``), else every ``poll_interval_seconds``. A 429
  backs the channel off and waits it out; a poll that times out or fails otherwise
  is asked again, the pause doubling up to ``MAX_POLL_PAUSE_SECONDS``. Only an
  answer that there is no such job (404, BFL's "Task not found"), the channel's
  key refused (401/403) or a final 4xx stops polling early.
- **Abandoned jobs.** A job the run stops waiting for while it may still run
  upstream (the deadline came, or polling stopped early) is cancelled there
  where the adapter can, and counted in
  ``tollgate_upstream_jobs_abandoned_total``. A job handed on with the task (a
  lost lease, a shutdown, the tenant's cancel) is not abandoned: another
  attempt resumes it, or the cancel job stops it.
- **Results** are checked by their bytes and their size (``workers/images.py``)
  and stored under fixed keys (``<task>/<index>.<ext>``), so a re-run
  overwrites rather than adds; a store that is away is waited for
  (``workers/result_store.py``).
"""

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from gateway import metrics
from pricing.catalog import ModelEntry
from pricing.request import ImageRequest
from workers.admission import Admission
from workers.deps import WorkerDeps
from workers.images import ImageSource, checked_size, fetch_image, image_of
from workers.lease import Lease, LeaseLost
from workers.providers.base import (
    JobState,
    UpstreamCancelled,
    UpstreamError,
    UpstreamJobFailed,
    UpstreamNotFound,
)
from workers.result_store import put_result
from workers.routing import Route

logger = logging.getLogger("tollgate.generate")

T = TypeVar("T")

MAX_POLL_PAUSE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored result: its storage key and its pixels, read from the image."""

    key: str
    width: int
    height: int


@dataclass
class UpstreamCalls:
    """The upstream calls of one run, on whichever channel it works."""

    deps: WorkerDeps
    task_id: str
    admission: Admission
    lease: Lease
    # The upstream job being polled, while it is: (channel, job id).
    polling: tuple[Route, str] | None = None

    async def generate_on(
        self, route: Route, entry: ModelEntry, request: ImageRequest, job_id: str | None
    ) -> list[Stored]:
        """Run (or resume, given ``job_id``) the generation on one channel; its stored results."""
        state = await self._upstream_result(route, entry, request, job_id)
        # The upstream job is over: its slot goes to the next task in line now. Fetching
        # and storing the results is no job on the account, and must not idle its cap.
        await self.admission.release_slot()
        if state.status == "failed":
            raise UpstreamJobFailed(state.error or "The upstream could not generate the image")
        if state.status == "cancelled":
            raise UpstreamCancelled("The upstream cancelled the generation")
        return await self._store(route, state, (request.width, request.height))

    async def _upstream_result(
        self, route: Route, entry: ModelEntry, request: ImageRequest, job_id: str | None
    ) -> JobState:
        provider = route.provider
        can_cancel = entry.can_cancel and provider.supports_cancel
        submitted_at = None  # a resumed job's submit is an earlier attempt's
        if job_id is None:
            self.lease.check_deadline()  # never pay for a generation the task cannot wait for
            if not self.lease.route_recorded(route.id):
                await self.lease.record_route(route.id, None, can_cancel=can_cancel)
            submitted = await self._call(
                route, "submit", lambda: provider.submit(route.upstream_model(entry), request)
            )
            if submitted.job_id is None:
                assert submitted.state is not None
                return submitted.state
            job_id = submitted.job_id
            submitted_at = time.monotonic()
            try:
                await self.lease.record_route(route.id, job_id, can_cancel=can_cancel, progress=10)
            except LeaseLost:
                # Cancelled (or taken over) while the upstream took the job: stop it there.
                if provider.supports_cancel:
                    await self._cancel_quietly(route, job_id)
                raise
        # Left set when the deadline ends the polling: the run abandons the job once it has
        # failed the task (if the sweeper failed it first, the sweeper has the job cancelled).
        self.polling = (route, job_id)
        try:
            state = await self._poll(route, entry.id, job_id, submitted_at)
        except UpstreamError as exc:
            self.polling = None
            if not isinstance(exc, UpstreamNotFound):  # a job the upstream lost costs nothing
                await self.abandon(route, job_id, "failover")
            raise
        self.polling = None
        return state

    async def abandon(self, route: Route, job_id: str, reason: str) -> None:
        """The run stops waiting for a job that may still run (and cost) upstream:
        cancel it there where the adapter can, and count it."""
        cancel = "unsupported"
        if route.provider.supports_cancel:
            try:
                await self._call(route, "cancel", lambda: route.provider.cancel(job_id))
                cancel = "confirmed"
            except UpstreamError as exc:
                cancel = "failed"
                logger.info("task %s: upstream cancel failed: %s", self.task_id, exc.message)
        logger.info(
            "task %s: upstream job on channel %s abandoned (%s), cancel %s",
            self.task_id,
            route.name,
            reason,
            cancel,
        )
        metrics.upstream_job_abandoned(route.adapter, route.name, reason, cancel)

    async def _cancel_quietly(self, route: Route, job_id: str) -> None:
        try:
            await self._call(route, "cancel", lambda: route.provider.cancel(job_id))
        except UpstreamError as exc:
            logger.info("task %s: upstream cancel failed: %s", self.task_id, exc.message)

    async def _call(self, route: Route, phase: str, call: Callable[[], Awaitable[T]]) -> T:
        """One upstream call, timed and counted by channel, phase and outcome."""
        started = time.monotonic()
        outcome = "ok"
        try:
            async with self.lease.kept_alive():
                return await call()
        except UpstreamError as exc:
            outcome = exc.outcome
            raise
        finally:
            metrics.observe_upstream(
                route.adapter, route.name, phase, outcome, time.monotonic() - started
            )

    async def _poll(
        self, route: Route, model: str, job_id: str, submitted_at: float | None
    ) -> JobState:
        """Poll the job until it ends; only the deadline, or an answer that the job cannot
        be waited for, stops it (see the module docstring). Polls are spent around the
        job's expected end when it was submitted here (``workers/job_clock.py``)."""
        interval = self.deps.settings.poll_interval_seconds
        clock = self.deps.job_clock
        failures = 0
        running_until = 0.0  # seconds from the submit to the last poll that found it running

        def next_pause() -> float:
            if submitted_at is None:
                return interval
            return clock.pause(route.id, model, interval, time.monotonic() - submitted_at)

        pause = next_pause()
        while True:
            await self.lease.sleep(pause)
            pause = interval
            asked = time.monotonic()
            try:
                state = await self._call(route, "poll", lambda: route.provider.poll(job_id))
            except UpstreamError as exc:
                if exc.rate_limited:
                    pause = max(pause, await self.admission.back_off(route, exc.retry_after))
                    continue
                if not exc.retryable or exc.opens_circuit or isinstance(exc, UpstreamNotFound):
                    raise
                # The job runs on upstream, paid for: asking again costs nothing, a new
                # submit would cost a second generation.
                failures += 1
                pause = min(interval * (1 << min(failures, 16)), MAX_POLL_PAUSE_SECONDS)
                logger.info(
                    "task %s: poll failed (%s); asking again in %.1fs",
                    self.task_id,
                    exc.message,
                    pause,
                )
                continue
            failures = 0
            if state.status in ("completed", "failed", "cancelled"):
                if submitted_at is not None and state.status == "completed":
                    clock.record(route.id, model, running_until, asked - submitted_at)
                return state
            if submitted_at is not None:
                running_until = asked - submitted_at
            await self.lease.maybe_beat(state.progress)
            pause = next_pause()

    async def _store(self, route: Route, state: JobState, asked: tuple[int, int]) -> list[Stored]:
        """Check and store the results, inline (``state.images``) or linked (``state.urls``);
        each must be an image of the size ``asked`` (width, height) within the tolerance."""
        settings = self.deps.settings
        source = ImageSource(
            client=self.deps.http,
            trusted_host=route.endpoint.host,
            max_bytes=settings.max_image_bytes,
            timeout=settings.upstream_timeout_seconds,
            allowed_hosts=self.deps.image_allowed_hosts,
            ca_bundle=settings.outbound_ca_bundle,
        )
        stored = []
        images: list[bytes | str] = [*state.images, *state.urls]
        for index, item in enumerate(images):
            self.lease.check_deadline()
            if isinstance(item, bytes):
                data, ext = image_of(item, settings.max_image_bytes)
            else:
                data, ext = await self._call(route, "download", partial(fetch_image, source, item))
            width, height = checked_size(data, ext, asked)
            key = f"{self.task_id}/{index}.{ext}"
            await put_result(
                self.deps.storage,
                key,
                data,
                remaining=self.lease.check_deadline,
                pause=self.lease.sleep,
            )
            stored.append(Stored(key, width, height))
            await self.lease.maybe_beat(90)
        return stored
