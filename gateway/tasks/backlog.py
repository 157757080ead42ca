"""Overload refused at submit: a model whose backlog cannot finish before a new task's
deadline answers 503 ``overloaded`` with ``Retry-After``, before anything is held.

The rule (docs/operations.md, "Overload"): for a model with ``open`` tasks (pending or
processing), ``slots`` upstream slots across the channels that serve it, and a recent
upstream job time ``T``, a new task should finish after about
``ceil((open + 1) / slots) × T`` seconds. When every slot is taken (``open >= slots``)
and that exceeds ``TOLLGATE_OVERLOAD_DEADLINE_FRACTION`` of
``TOLLGATE_TASK_DEADLINE_SECONDS``, the submit is refused; ``Retry-After`` is the time the
excess needs to drain (1–60 s). A model with a free slot always takes the task.

Cheap per request: each gateway process keeps one estimate per model, refreshed in the
background at most every ``TOLLGATE_OVERLOAD_REFRESH_SECONDS`` (one grouped count over the
open-task index, the channels table, one Redis pipeline of the job times), and counts the
submits it accepted since, so a burst between two refreshes is seen. A submit only reads
the estimate. If a refresh fails (PostgreSQL or Redis down) the last estimate stays; with
no estimate, or no job time yet and no catalogue estimate, nothing is refused.

``T`` is the median of the last ``JOB_TIMES_KEPT`` job times workers pushed
(at a run's end, after an upstream job ends with its images stored:
``workers/run_end.py``), else the
catalogue's ``estimated_seconds`` for the model.

Slots ÷ ``T`` is what the upstream can take, not what the workers manage: workers short of
CPU (or of processes) start jobs slower than slots free up. So each process also samples
a counter of the model's finished jobs (``jobs_done_key``, which a run's end
increments) at every refresh; once the model has had a line (``open >= slots``) without a
break for ``DRAIN_MIN_SPAN_SECONDS`` (within the last ``DRAIN_WINDOW_SECONDS``), the
workers were busy all that time, and the counter's rate over it is the real drain rate.
The estimate is then the larger of the two: ``max(ceil((open + 1) / slots) × T,
(open + 1) ÷ drain)``. A drain of zero (a stall: an outage, every worker restarting) is
not used: nothing is known about how fast the line will move once it ends. Plain Python:
workers import it.
"""

import asyncio
import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import metrics
from gateway.errors import ApiError
from gateway.redis_keys import job_times_key, jobs_done_key
from gateway.settings import Settings
from pricing.catalog import Catalog

logger = logging.getLogger("tollgate.backlog")

JOB_TIMES_KEPT = 32
JOB_TIMES_TTL_SECONDS = 3600
# The drain rate is measured over at most this long, and only over a line this old.
DRAIN_WINDOW_SECONDS = 60.0
DRAIN_MIN_SPAN_SECONDS = 10.0


class Overloaded(ApiError):
    status = 503
    code = "overloaded"
    type = "api_error"
    default_message = "The model is overloaded: its backlog cannot finish in time"


@dataclass(frozen=True, slots=True)
class ModelLoad:
    open_tasks: int
    slots: int
    job_seconds: float
    drain_per_second: float | None = None  # measured under a line; None: not known

    def finish_seconds(self, more: int) -> float:
        """When a new task would finish, with ``more`` tasks accepted since the count."""
        ahead = self.open_tasks + more + 1
        by_slots = math.ceil(ahead / self.slots) * self.job_seconds
        if self.drain_per_second:
            return max(by_slots, ahead / self.drain_per_second)
        return by_slots


class DrainMeter:
    """Samples of each model's finished-jobs counter; the rate under an unbroken line."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[tuple[float, int, bool]]] = {}

    def observe(self, model: str, at: float, done: int, line: bool) -> float | None:
        """Add a sample (``line``: the model had ``open >= slots``); the drain rate, if known."""
        samples = self._samples.setdefault(model, deque())
        if samples and done < samples[-1][1]:
            samples.clear()  # the counter restarted (Redis lost it)
        samples.append((at, done, line))
        while samples[0][0] < at - DRAIN_WINDOW_SECONDS:
            samples.popleft()
        first = None
        for sample in reversed(samples):
            if not sample[2]:
                break
            first = sample
        if first is None or at - first[0] < DRAIN_MIN_SPAN_SECONDS:
            return None
        rate = (done - first[1]) / (at - first[0])
        return rate if rate > 0 else None


_OPEN = text(
    "SELECT model, count(*) FROM tasks WHERE status IN ('pending', 'processing') GROUP BY model"
)
_CHANNELS = text("SELECT models, max_concurrency FROM channels WHERE enabled")


class Backlog:
    """One process's estimate of every model's backlog (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, redis: Redis, settings: Settings, catalog: Catalog):
        self._engine = engine
        self._redis = redis
        self._settings = settings
        self._catalog = catalog
        self._loads: dict[str, ModelLoad] = {}
        self._drain = DrainMeter()
        self._accepted: dict[str, int] = {}
        self._refreshed = -math.inf  # when the last refresh started
        self._counted = -math.inf  # when the estimate in use was counted
        self._refreshing: asyncio.Task[None] | None = None
        self._failing = False
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self._settings.overload_deadline_fraction > 0

    def estimates(self) -> dict[str, float]:
        """Each model's estimated seconds until a new task would finish (for /metrics)."""
        return {m: load.finish_seconds(self._accepted.get(m, 0)) for m, load in self._loads.items()}

    async def check(self, model: str) -> None:
        """Raise Overloaded if a new task of ``model`` could not finish in time.

        Reads the estimate; a refusal from an estimate older than one refresh interval (the
        first submit after a quiet spell) is checked again against a fresh one first.
        """
        if not self.enabled:
            return
        self._maybe_refresh()
        retry = self._refusal(model)
        if retry is not None and self._stale() and self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            retry = self._refusal(model)
        if retry is not None:
            finish, seconds = retry
            raise Overloaded(
                f"Model {model} is overloaded: a new task would finish in about {finish:.0f} s, "
                f"past its deadline; retry after {seconds} s",
                headers={"Retry-After": str(seconds)},
            )

    def _refusal(self, model: str) -> tuple[float, int] | None:
        load = self._loads.get(model)
        if load is None:
            return None
        ahead = load.open_tasks + self._accepted.get(model, 0)
        finish = load.finish_seconds(self._accepted.get(model, 0))
        limit = self._settings.overload_deadline_fraction * self._settings.task_deadline_seconds
        if ahead < load.slots or finish <= limit:
            return None  # a free slot takes the task, whatever the estimate says
        return finish, min(60, max(1, math.ceil(finish - limit)))

    def _stale(self) -> bool:
        return time.monotonic() - self._counted > self._interval()

    async def close(self) -> None:
        """Wait for a refresh in flight (before the engine and Redis pools close)."""
        self._closed = True
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)

    def accepted(self, model: str) -> None:
        if self.enabled:
            self._accepted[model] = self._accepted.get(model, 0) + 1

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if self._closed or self._refreshing is not None or now - self._refreshed < self._interval():
            return
        self._refreshed = now
        self._refreshing = asyncio.create_task(self._refresh_quietly())

    def _interval(self) -> float:
        return self._settings.overload_refresh_seconds

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
            if self._failing:
                logger.info("backlog estimate refreshed again")
            self._failing = False
        except Exception as exc:  # a dependency down: keep the last estimate
            if not self._failing:
                logger.warning("backlog estimate not refreshed (keeping the last one): %s", exc)
            self._failing = True
        finally:
            self._refreshing = None

    async def refresh(self) -> None:
        """Count open tasks, sum slots, read job times; replace the estimate."""
        started = time.monotonic()
        # Submits this process accepts while the count runs may be missing from it: keep
        # counting them (counted twice at worst, which errs on the side of refusing).
        before = dict(self._accepted)
        async with self._engine.connect() as conn:
            open_tasks = {str(m): int(n) for m, n in (await conn.execute(_OPEN)).all()}
            channels = [(m, c) for m, c in (await conn.execute(_CHANNELS)).all()]
        # Every model, open tasks or not: a burst from idle is counted from the first submit.
        models = sorted({entry.id for entry in self._catalog.models} | set(open_tasks))
        slots = self._slots(models, channels)
        times, done = await self._job_times(models)
        loads = {}
        for model in models:
            entry = self._catalog.model(model)
            job = times.get(model) or (float(entry.estimated_seconds) if entry else 0.0)
            count = open_tasks.get(model, 0)
            if slots.get(model) and job > 0:
                line = count >= slots[model]
                drain = self._drain.observe(model, started, done.get(model, 0), line)
                loads[model] = ModelLoad(count, slots[model], job, drain)
        for gone in self._loads.keys() - loads.keys():
            metrics.MODEL_BACKLOG.labels(gone).set(0)
        for model, load in loads.items():
            metrics.MODEL_BACKLOG.labels(model).set(load.finish_seconds(0))
        self._loads = loads
        self._accepted = {
            m: n - before.get(m, 0) for m, n in self._accepted.items() if n > before.get(m, 0)
        }
        self._counted = started

    def _slots(self, models: list[str], channels: list[tuple[object, object]]) -> dict[str, int]:
        """Slots across every channel serving each model: the table's and TOLLGATE_UPSTREAMS'."""
        found: dict[str, int] = {}
        for model in models:
            entry = self._catalog.model(model)
            account = self._settings.upstreams.get(entry.provider) if entry else None
            total = account.max_concurrency if account is not None else 0
            for served, concurrency in channels:
                if isinstance(served, dict) and model in served:
                    total += int(str(concurrency))
            found[model] = total
        return found

    async def _job_times(self, models: list[str]) -> tuple[dict[str, float], dict[str, int]]:
        """Each model's median job time, and its finished-jobs counter."""
        if not models:
            return {}, {}
        queue = self._settings.queue_name
        async with self._redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.lrange(job_times_key(queue, model), 0, JOB_TIMES_KEPT - 1)
                pipe.get(jobs_done_key(queue, model))
            raw = await pipe.execute()
        found, done = {}, {}
        for i, model in enumerate(models):
            seconds = [float(v) for v in raw[2 * i] or []]
            if seconds:
                found[model] = statistics.median(seconds)
            done[model] = int(raw[2 * i + 1] or 0)
        return found, done
