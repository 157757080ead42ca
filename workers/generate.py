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
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import utcnow
from gateway.settings import Settings
from gateway.storage import Storage
from gateway.tasks import lifecycle
from pricing.catalog import Catalog
from pricing.request import ImageRequest
from workers.images import fetch_image
from workers.providers.base import JobState, Provider, UpstreamError

logger = logging.getLogger("tollgate.generate")

T = TypeVar("T")

SUBMIT_TRIES = 4
MAX_POLL_FAILURES = 5


@dataclass
class WorkerDeps:
    settings: Settings
    catalog: Catalog
    engine: AsyncEngine
    storage: Storage
    http: httpx.AsyncClient
    providers: dict[str, Provider]


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

    async def execute(self) -> str:
        settings = self.settings
        async with self.deps.engine.begin() as conn:
            claimed = await lifecycle.claim(
                conn, self.task_id, self.attempt, settings.lease_seconds
            )
        if claimed is None:
            return "skipped: task final or owned by another attempt"
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
        self._last_beat = time.monotonic()

    async def _maybe_beat(self, progress: int | None) -> None:
        # Renew at a third of the lease: few writes, and two chances before it runs out.
        if time.monotonic() - self._last_beat >= self.settings.lease_seconds / 3:
            await self._beat(progress=progress)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(SUBMIT_TRIES):
            try:
                return await call()
            except UpstreamError as exc:
                if not exc.retryable or attempt == SUBMIT_TRIES - 1:
                    raise
                base = self.settings.upstream_retry_base_seconds
                delay = exc.retry_after if exc.retry_after is not None else base * 2**attempt
                logger.info("task %s: %s; retrying in %.1fs", self.task_id, exc.message, delay)
                await self._sleep(delay)
        raise AssertionError("unreachable")

    async def _sleep(self, seconds: float) -> None:
        """Sleep, keeping the lease alive, and give up at the deadline."""
        end = time.monotonic() + min(seconds, self._check_deadline())
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.settings.lease_seconds / 3))
            await self._maybe_beat(None)
        self._check_deadline()

    async def _poll(self, provider: Provider, job_id: str) -> JobState:
        failures = 0
        while True:
            await self._sleep(self.settings.poll_interval_seconds)
            try:
                state = await provider.poll(job_id)
            except UpstreamError as exc:
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
    outcome = await GenerationRun(deps, task_id, attempt).execute()
    logger.info("task %s attempt %d: %s", task_id, attempt, outcome)
    return outcome
