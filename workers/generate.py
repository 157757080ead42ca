"""The generation job: one task, from its upstream call to its stored results.

Jobs may run more than once (arq delivers at least once, and the reconciler
re-queues a task whose worker went silent). The job is safe to repeat:

- it re-reads the task and claims it for its own ``attempt``; a job for an
  older attempt, or for a task already final, does nothing;
- the upstream job id is recorded as soon as the upstream gives one, so a
  re-run resumes polling that job instead of paying for a second generation;
- results are stored under fixed keys (``<task>/<index>.<ext>``), so a re-run
  overwrites rather than adds, and the task row names them only once it
  completes;
- every write is fenced by ``attempt`` (``gateway/tasks/lifecycle.py``).

Workers raise no HTTP errors: a transient upstream failure is retried here
with back-off until the task's deadline; a final one fails the task.

Upstream concurrency (``workers/upstream_slots.py``): the job takes a slot on
the task's upstream account before it claims the task, and gives it back on
every way out. Refused, it leaves the task pending and has arq run it again
later (``Retry``), so waiting holds no worker and fails nothing. An upstream
429 backs the whole account off for its Retry-After; waiting one out is not
one of a submit's tries (the deadline still bounds it).
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import httpx
from arq.worker import Retry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import utcnow
from gateway.settings import Settings
from gateway.storage import Storage
from gateway.tasks import lifecycle
from gateway.tasks.models import OPEN_STATES
from pricing.catalog import Catalog
from pricing.request import ImageRequest
from workers.callbacks import enqueue_for_task
from workers.images import fetch_image
from workers.providers.base import JobState, Provider, UpstreamError
from workers.upstream_slots import UpstreamSlots, backoff_seconds

logger = logging.getLogger("tollgate.generate")

T = TypeVar("T")

SUBMIT_TRIES = 4
MAX_POLL_FAILURES = 5
SKIPPED = "skipped: task final or owned by another attempt"


@dataclass
class WorkerDeps:
    settings: Settings
    catalog: Catalog
    engine: AsyncEngine
    storage: Storage
    http: httpx.AsyncClient
    providers: dict[str, Provider]
    # Upstream concurrency caps; None runs without them (tests that drive the job by hand).
    slots: UpstreamSlots | None = None


@dataclass(frozen=True, slots=True)
class Peeked:
    provider: str
    status: str
    attempt: int
    upstream_job_id: str | None
    created_at: datetime


class LeaseLost(Exception):
    """Another attempt owns the task now; this run stops without writing."""


class DeadlineExceeded(Exception):
    pass


class GenerationRun:
    def __init__(self, deps: WorkerDeps, task_id: str, attempt: int) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.task_id = task_id
        self.attempt = attempt
        self.deadline = 0.0  # monotonic; set once the task is claimed
        self._last_beat = 0.0
        self.holder = f"{task_id}:{attempt}"  # in the upstream's slots
        self._provider = ""  # set once the task is claimed
        self.callback_url: str | None = None  # likewise
        self._slot: str | None = None  # the upstream whose slot this run holds

    async def execute(self) -> str:
        slots = self.deps.slots
        shared = False
        if slots is not None:
            task = await self._peek()
            if task is None or task.status not in OPEN_STATES or task.attempt != self.attempt:
                if task is not None:  # it may have waited in the line
                    await slots.release(task.provider, self.holder)
                return SKIPPED
            account = self.settings.upstreams.get(task.provider)
            if account is not None:  # without one the run fails the task: no_upstream
                grant = await slots.acquire(
                    task.provider,
                    self.holder,
                    cap=account.max_concurrency,
                    ticket_ms=int(task.created_at.timestamp() * 1000),
                    running=task.upstream_job_id is not None,
                )
                if not grant.acquired:
                    logger.debug(
                        "task %s waits %.2fs for a %s slot",
                        self.task_id,
                        grant.wait_seconds,
                        task.provider,
                    )
                    raise Retry(defer=grant.wait_seconds)
                self._slot, shared = task.provider, grant.already_held
        try:
            return await self._claim_and_run(shared)
        finally:
            if self._slot is not None and slots is not None:
                await slots.release(self._slot, self.holder)

    async def _peek(self) -> Peeked | None:
        """The task as far as taking a slot needs it; None if there is no such task."""
        c = lifecycle.tasks.c
        stmt = select(c.provider, c.status, c.attempt, c.upstream_job_id, c.created_at).where(
            c.id == self.task_id
        )
        async with self.deps.engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        return None if row is None else Peeked(*row)

    async def _claim_and_run(self, shared_slot: bool) -> str:
        settings = self.settings
        async with self.deps.engine.begin() as conn:
            claimed = await lifecycle.claim(
                conn, self.task_id, self.attempt, settings.lease_seconds
            )
        if claimed is None:
            if shared_slot:
                # Another delivery of this job holds the task and, with it, the same slot.
                self._slot = None
            return SKIPPED
        self._provider = claimed.provider
        self.callback_url = claimed.callback_url
        self._last_beat = time.monotonic()
        age = (utcnow() - claimed.created_at).total_seconds()
        self.deadline = time.monotonic() + settings.task_deadline_seconds - age
        try:
            return await self._run(claimed)
        except LeaseLost:
            return "stopped: lease lost to another attempt"
        except DeadlineExceeded:
            await self._fail(
                "timeout",
                f"The generation did not finish within {settings.task_deadline_seconds} seconds",
            )
            return "failed: deadline"
        except UpstreamError as exc:
            await self._fail(exc.code, exc.message)
            return f"failed: {exc.code}"

    async def _run(self, claimed: lifecycle.Claimed) -> str:
        entry = self.deps.catalog.model(claimed.model)
        provider = self.deps.providers.get(claimed.provider)
        if entry is None or provider is None:
            await self._fail("no_upstream", f"No upstream is configured for model {claimed.model}")
            return "failed: no upstream"
        request = ImageRequest.from_json(claimed.request)
        job_id = claimed.upstream_job_id
        if job_id is None:
            submitted = await self._retrying(lambda: provider.submit(entry.upstream_model, request))
            if submitted.job_id is not None:
                job_id = submitted.job_id
                await self._beat(progress=10, upstream_job_id=job_id)
                state = await self._poll(provider, job_id)
            else:
                assert submitted.state is not None
                state = submitted.state
        else:
            state = await self._poll(provider, job_id)

        if state.status == "completed":
            keys = await self._store(state.urls)
            async with self.deps.engine.begin() as conn:
                done = await lifecycle.complete(
                    conn, self.task_id, self.attempt, keys, self.settings.result_url_ttl_seconds
                )
            if not done:
                raise LeaseLost
            return f"completed: {len(keys)} image(s)"
        if state.status == "cancelled":
            await self._fail("upstream_cancelled", "The upstream cancelled the generation")
            return "failed: cancelled upstream"
        await self._fail(
            "generation_failed", state.error or "The upstream could not generate the image"
        )
        return "failed: upstream"

    def _check_deadline(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded
        return remaining

    async def _beat(
        self, *, progress: int | None = None, upstream_job_id: str | None = None
    ) -> None:
        async with self.deps.engine.begin() as conn:
            alive = await lifecycle.heartbeat(
                conn,
                self.task_id,
                self.attempt,
                self.settings.lease_seconds,
                progress=progress,
                upstream_job_id=upstream_job_id,
            )
        if not alive:
            raise LeaseLost
        if self._slot is not None and self.deps.slots is not None:
            await self.deps.slots.renew(self._slot, self.holder)
        self._last_beat = time.monotonic()

    async def _maybe_beat(self, progress: int | None) -> None:
        # Renew at a third of the lease: few writes, and two chances before it runs out.
        if time.monotonic() - self._last_beat >= self.settings.lease_seconds / 3:
            await self._beat(progress=progress)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        failures = 0
        while True:
            try:
                return await call()
            except UpstreamError as exc:
                if exc.rate_limited:
                    delay = await self._back_off(exc)
                else:
                    failures += 1
                    if not exc.retryable or failures == SUBMIT_TRIES:
                        raise
                    base = self.settings.upstream_retry_base_seconds
                    delay = (
                        exc.retry_after
                        if exc.retry_after is not None
                        else base * 2 ** (failures - 1)
                    )
                logger.info("task %s: %s; retrying in %.1fs", self.task_id, exc.message, delay)
                await self._sleep(delay)

    async def _back_off(self, exc: UpstreamError) -> float:
        """The upstream said 429: hold back every worker on this account; returns the wait."""
        if self.deps.slots is None:
            return backoff_seconds(exc.retry_after)
        return await self.deps.slots.back_off(self._provider, exc.retry_after)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, keeping the lease alive, and give up at the deadline."""
        end = time.monotonic() + min(seconds, self._check_deadline())
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.settings.lease_seconds / 3))
            await self._maybe_beat(None)
        self._check_deadline()

    async def _poll(self, provider: Provider, job_id: str) -> JobState:
        failures = 0
        pause = self.settings.poll_interval_seconds
        while True:
            await self._sleep(pause)
            pause = self.settings.poll_interval_seconds
            try:
                state = await provider.poll(job_id)
            except UpstreamError as exc:
                if exc.rate_limited:
                    pause = max(pause, await self._back_off(exc))
                    continue
                failures += 1
                if not exc.retryable or failures >= MAX_POLL_FAILURES:
                    raise
                continue
            failures = 0
            if state.status in ("completed", "failed", "cancelled"):
                return state
            await self._maybe_beat(state.progress)

    async def _store(self, urls: tuple[str, ...]) -> list[str]:
        keys = []
        for index, url in enumerate(urls):
            self._check_deadline()
            data, ext = await fetch_image(
                self.deps.http, url, max_bytes=self.settings.max_image_bytes
            )
            key = f"{self.task_id}/{index}.{ext}"
            await self.deps.storage.put(key, data)
            keys.append(key)
            await self._maybe_beat(90)
        return keys

    async def _fail(self, code: str, message: str) -> None:
        async with self.deps.engine.begin() as conn:
            await lifecycle.fail(conn, self.task_id, self.attempt, code, message)


async def generate_task(ctx: dict[str, Any], task_id: str, attempt: int) -> str:
    """arq job: run one attempt of one task (see the module docstring)."""
    deps: WorkerDeps = ctx["deps"]
    run = GenerationRun(deps, task_id, attempt)
    outcome = await run.execute()
    logger.info("task %s attempt %d: %s", task_id, attempt, outcome)
    if run.callback_url and outcome.startswith(("completed", "failed")):
        # The delivery row was committed with the task's end; queue its first attempt now
        # (the callback reconciler would otherwise find it, later).
        await enqueue_for_task(ctx["redis"], deps.settings, deps.engine, task_id)
    return outcome
