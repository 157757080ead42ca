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
- **Polls.** A 429 backs the channel off and waits it out; a retryable failure
  is borne ``MAX_POLL_FAILURES`` times in a row.
- **Results** are checked by their bytes (``workers/images.py``) and stored
  under fixed keys (``<task>/<index>.<ext>``), so a re-run overwrites rather
  than adds; a store that is away is waited for (``workers/result_store.py``).
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
from workers.images import ImageSource, fetch_image, image_of
from workers.lease import Lease, LeaseLost
from workers.providers.base import JobState, UpstreamCancelled, UpstreamError, UpstreamJobFailed
from workers.result_store import put_result
from workers.routing import Route

logger = logging.getLogger("tollgate.generate")

T = TypeVar("T")

MAX_POLL_FAILURES = 5


@dataclass
class UpstreamCalls:
    """The upstream calls of one run, on whichever channel it works."""

    deps: WorkerDeps
    task_id: str
    admission: Admission
    lease: Lease

    async def generate_on(
        self, route: Route, entry: ModelEntry, request: ImageRequest, job_id: str | None
    ) -> list[str]:
        """Run (or resume, given ``job_id``) the generation on one channel; its stored keys."""
        state = await self._upstream_result(route, entry, request, job_id)
        if state.status == "failed":
            raise UpstreamJobFailed(state.error or "The upstream could not generate the image")
        if state.status == "cancelled":
            raise UpstreamCancelled("The upstream cancelled the generation")
        return await self._store(route, state)

    async def _upstream_result(
        self, route: Route, entry: ModelEntry, request: ImageRequest, job_id: str | None
    ) -> JobState:
        provider = route.provider
        can_cancel = entry.can_cancel and provider.supports_cancel
        if job_id is None:
            self.lease.check_deadline()  # never pay for a generation the task cannot wait for
            await self.lease.record_route(route.id, None, can_cancel=can_cancel)
            submitted = await self._call(
                route, "submit", lambda: provider.submit(route.upstream_model(entry), request)
            )
            if submitted.job_id is None:
                assert submitted.state is not None
                return submitted.state
            job_id = submitted.job_id
            try:
                await self.lease.record_route(route.id, job_id, can_cancel=can_cancel, progress=10)
            except LeaseLost:
                # Cancelled (or taken over) while the upstream took the job: stop it there.
                if provider.supports_cancel:
                    await self._cancel_quietly(route, job_id)
                raise
        return await self._poll(route, job_id)

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

    async def _poll(self, route: Route, job_id: str) -> JobState:
        failures = 0
        pause = self.deps.settings.poll_interval_seconds
        while True:
            await self.lease.sleep(pause)
            pause = self.deps.settings.poll_interval_seconds
            try:
                state = await self._call(route, "poll", lambda: route.provider.poll(job_id))
            except UpstreamError as exc:
                if exc.rate_limited:
                    pause = max(pause, await self.admission.back_off(route, exc.retry_after))
                    continue
                failures += 1
                if not exc.retryable or failures >= MAX_POLL_FAILURES:
                    raise
                continue
            failures = 0
            if state.status in ("completed", "failed", "cancelled"):
                return state
            await self.lease.maybe_beat(state.progress)

    async def _store(self, route: Route, state: JobState) -> list[str]:
        """Check and store the results, inline (``state.images``) or linked (``state.urls``)."""
        settings = self.deps.settings
        source = ImageSource(
            client=self.deps.http,
            trusted_host=route.endpoint.host,
            max_bytes=settings.max_image_bytes,
            timeout=settings.upstream_timeout_seconds,
            allowed_hosts=self.deps.image_allowed_hosts,
            ca_bundle=settings.outbound_ca_bundle,
        )
        keys = []
        images: list[bytes | str] = [*state.images, *state.urls]
        for index, item in enumerate(images):
            self.lease.check_deadline()
            if isinstance(item, bytes):
                data, ext = image_of(item, settings.max_image_bytes)
            else:
                data, ext = await self._call(route, "download", partial(fetch_image, source, item))
            key = f"{self.task_id}/{index}.{ext}"
            await put_result(
                self.deps.storage,
                key,
                data,
                remaining=self.lease.check_deadline,
                pause=self.lease.sleep,
            )
            keys.append(key)
            await self.lease.maybe_beat(90)
        return keys
