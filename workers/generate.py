"""The generation job: one task, from its upstream call to its stored results.

Jobs may run more than once (arq delivers at least once, and the reconciler
re-queues a task whose worker went silent). The job is safe to repeat:

- it re-reads the task and claims it for its own ``attempt``; a job for an
  older attempt, or for a task already final, does nothing;
- the channel and upstream job id are recorded as soon as the upstream gives
  one, so a re-run resumes polling that job instead of paying for a second
  generation;
- results are stored under fixed keys (``<task>/<index>.<ext>``), so a re-run
  overwrites rather than adds, and the task row names them only once it
  completes;
- every write is fenced by ``attempt`` (``gateway/tasks/lifecycle.py``).

Routing (``workers/routing.py``, docs/channels.md): the task goes to the first
channel, in the directory's order, whose circuit lets it through and which
grants it a slot. A retryable failure there (connect error, timeout, 5xx, a
body we cannot read, or a poll that keeps failing) counts against the
channel's circuit and moves the task to the next channel; a 429 backs the
channel off for its Retry-After and moves on too. When every channel has been
tried, the job waits (``upstream_retry_base_seconds`` × 1, 2, 4, or the
Retry-After) and starts over, ``SUBMIT_ROUNDS`` rounds at most; waiting out a
429 is not a round. A 4xx that is the request's fault fails the task at once.
The task's deadline bounds everything.

Shutdown: a worker stopped with SIGTERM stops taking jobs and lets running
ones finish for ``worker_shutdown_grace_seconds``; a job still running then is
cancelled and hands its task back (its lease ends at once), and arq queues the
job again, so another worker resumes the same upstream job without waiting
for the lease to run out. Nothing is lost. An asynchronous upstream job is
resumed, never generated twice; a synchronous generation cut off mid-call has
no job to resume and is submitted again, so keep the grace period at least
``upstream_timeout_seconds`` where synchronous channels serve.

Upstream concurrency (``workers/upstream_slots.py``): the job takes a slot on
its channel before it claims the task, and gives it back on every way out.
Refused everywhere, it leaves the task pending and has arq run it again later
(``Retry``), so waiting holds no worker and fails nothing. Moving to another
channel mid-run takes a slot there first, waiting for one while keeping the
task's lease.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import httpx
from arq.worker import Retry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import logs, metrics
from gateway.db import utcnow
from gateway.settings import Settings
from gateway.storage import Storage
from gateway.tasks import lifecycle
from gateway.tasks.models import OPEN_STATES
from pricing.catalog import Catalog, ModelEntry
from pricing.request import ImageRequest
from workers.callbacks import enqueue_for_task
from workers.circuits import Circuits
from workers.images import ImageSource, fetch_image, image_of
from workers.providers.base import (
    JobState,
    UpstreamCancelled,
    UpstreamError,
    UpstreamJobFailed,
)
from workers.routing import Directory, Route
from workers.upstream_slots import MIN_WAIT_SECONDS, UpstreamSlots, backoff_seconds

logger = logging.getLogger("tollgate.generate")

T = TypeVar("T")

SUBMIT_ROUNDS = 4
MAX_POLL_FAILURES = 5
SKIPPED = "skipped: task final or owned by another attempt"


@dataclass
class WorkerDeps:
    settings: Settings
    catalog: Catalog
    engine: AsyncEngine
    storage: Storage
    http: httpx.AsyncClient
    directory: Directory
    # Upstream concurrency caps and circuits; None runs without them (tests that
    # drive the job by hand).
    slots: UpstreamSlots | None = None
    circuits: Circuits | None = None
    # Hosts exempt from the address guard when fetching result images (tests only).
    image_allowed_hosts: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Peeked:
    model: str
    status: str
    attempt: int
    upstream_job_id: str | None
    channel_id: str | None
    created_at: datetime


class LeaseLost(Exception):
    """Another attempt owns the task now; this run stops without writing."""


class DeadlineExceeded(Exception):
    pass


def slot_name(settings: Settings, route: Route) -> str:
    """A channel's slots in Redis, apart from other deployments sharing that Redis."""
    return f"{settings.queue_name}|{route.id}"


class GenerationRun:
    def __init__(self, deps: WorkerDeps, task_id: str, attempt: int) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.task_id = task_id
        self.attempt = attempt
        self.deadline = 0.0  # monotonic; set once the task is claimed
        self._last_beat = 0.0
        self.holder = f"{task_id}:{attempt}"  # in the channels' slots and circuits
        self.route: Route | None = None  # the channel this run works on
        self.callback_url: str | None = None  # set once the task is claimed
        self._slot: str | None = None  # the slot this run holds, if any
        self._ticket_ms = 0  # its place in a channel's line: the task's submission (ms)
        self._lines: set[str] = set()  # slot lines this run may wait in
        self._probes: set[str] = set()  # channels whose half-open probe this run holds

    # --- Before the claim: a channel and a slot -------------------------------

    async def execute(self) -> str:
        task = await self._peek()
        if task is None or task.status not in OPEN_STATES or task.attempt != self.attempt:
            if task is not None:  # it may have waited in the lines
                await self._leave_lines(await self.deps.directory.candidates(task.model))
            return SKIPPED
        routes = await self._ordered_routes(task)
        shared = False
        if routes:
            self.route, shared = await self._take_first_slot(routes, task)
        try:
            return await self._claim_and_run(shared)
        finally:
            await self._release_slot()
            await self._leave_all()

    async def _peek(self) -> Peeked | None:
        """The task as far as routing needs it; None if there is no such task."""
        c = lifecycle.tasks.c
        stmt = select(
            c.model, c.status, c.attempt, c.upstream_job_id, c.channel_id, c.created_at
        ).where(c.id == self.task_id)
        async with self.deps.engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        return None if row is None else Peeked(*row)

    async def _ordered_routes(self, task: Peeked) -> list[Route]:
        """The channels to try: the one a running upstream job lives on first."""
        routes = await self.deps.directory.candidates(task.model)
        if task.upstream_job_id and task.channel_id:
            running = await self.deps.directory.get(task.channel_id)
            if running is not None:
                routes = [running, *(r for r in routes if r.id != running.id)]
        return routes

    async def _take_first_slot(self, routes: list[Route], task: Peeked) -> tuple[Route, bool]:
        """The first channel that lets this run in, or ``Retry`` when none does yet."""
        slots = self.deps.slots
        if slots is None:
            return routes[0], False
        waits: list[float] = []
        tried: list[Route] = []
        for route in routes:
            resuming = route.id == task.channel_id and task.upstream_job_id is not None
            if not resuming:
                state = await self._circuit(route)
                if state is not None:
                    waits.append(state)
                    continue
            name = slot_name(self.settings, route)
            grant = await slots.acquire(
                name,
                self.holder,
                cap=route.max_concurrency,
                ticket_ms=int(task.created_at.timestamp() * 1000),
                running=resuming,
            )
            if grant.acquired:
                self._slot = name
                await self._leave_lines(tried)
                return route, grant.already_held
            await self._unprobe(route)
            tried.append(route)
            waits.append(grant.wait_seconds)
        wait = max(min(waits), MIN_WAIT_SECONDS)
        logger.debug("task %s waits %.2fs for a channel", self.task_id, wait)
        raise Retry(defer=wait)

    async def _circuit(self, route: Route) -> float | None:
        """None if the channel's circuit lets this run through, else seconds to wait."""
        if self.deps.circuits is None:
            return None
        state = await self.deps.circuits.state(route.id, self.holder)
        if state.probing:
            self._probes.add(route.id)
        return state.retry_in if state.open else None

    async def _unprobe(self, route: Route) -> None:
        """This run will not use the channel now: let another task probe it."""
        if route.id in self._probes and self.deps.circuits is not None:
            self._probes.discard(route.id)
            await self.deps.circuits.release_probe(route.id, self.holder)

    async def _circuit_outcome(self, route: Route, *, failed: bool) -> None:
        if self.deps.circuits is None:
            return
        self._probes.discard(route.id)
        if failed:
            await self.deps.circuits.failure(route.id, route.name)
        else:
            await self.deps.circuits.success(route.id)

    async def _leave_lines(self, routes: list[Route]) -> None:
        if self.deps.slots is not None:
            for route in routes:
                await self.deps.slots.release(slot_name(self.settings, route), self.holder)

    async def _leave_all(self) -> None:
        """Leave every line this run joined and give up probes it did not use."""
        if self.deps.slots is not None:
            for name in self._lines - {self._slot}:
                await self.deps.slots.release(name, self.holder)
        self._lines.clear()
        if self.deps.circuits is not None:
            for channel in self._probes:
                await self.deps.circuits.release_probe(channel, self.holder)
        self._probes.clear()

    async def _release_slot(self) -> None:
        if self._slot is not None and self.deps.slots is not None:
            await self.deps.slots.release(self._slot, self.holder)
        self._slot = None

    # --- The claimed run ---------------------------------------------------------

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
        self.callback_url = claimed.callback_url
        logs.bind(request_id=claimed.request_id)
        self._ticket_ms = int(claimed.created_at.timestamp() * 1000)
        self._last_beat = time.monotonic()
        age = (utcnow() - claimed.created_at).total_seconds()
        self.deadline = time.monotonic() + settings.task_deadline_seconds - age
        try:
            return await self._run_to_an_end(claimed)
        except asyncio.CancelledError:
            # The worker is shutting down past its grace period (arq re-queues the job).
            await asyncio.shield(self._hand_back())
            raise
        except LeaseLost:
            return "stopped: lease lost to another attempt"

    async def _run_to_an_end(self, claimed: lifecycle.Claimed) -> str:
        """Run the task; a deadline or an upstream error that ends it fails it."""
        try:
            return await self._run(claimed)
        except DeadlineExceeded:
            deadline = self.settings.task_deadline_seconds
            await self._fail("timeout", f"The generation did not finish within {deadline} seconds")
            return "failed: deadline"
        except UpstreamError as exc:
            await self._fail(exc.code, exc.message)
            return f"failed: {exc.code}"

    async def _run(self, claimed: lifecycle.Claimed) -> str:
        entry = self.deps.catalog.model(claimed.model)
        route = self.route
        if entry is None or route is None:
            await self._fail("no_upstream", f"No upstream is configured for model {claimed.model}")
            return "failed: no upstream"
        request = ImageRequest.from_json(claimed.request)
        job_id = claimed.upstream_job_id if claimed.channel_id == route.id else None
        tried: list[str] = []  # channels tried in this round
        spent: list[str] = []  # channels that gave a final answer (job failed, bad result)
        rounds = 0
        while True:
            try:
                keys = await self._generate_on(route, entry, request, job_id)
                break
            except UpstreamError as exc:
                if not (exc.retryable or exc.try_elsewhere):
                    raise
                if exc.rate_limited:
                    await self._back_off(route, exc)
                    await self._unprobe(route)
                else:
                    await self._circuit_outcome(route, failed=True)
                logger.info(
                    "task %s: channel %s failed (%s); trying another",
                    self.task_id,
                    route.name,
                    exc.message,
                )
                (spent if exc.try_elsewhere else tried).append(route.id)
                job_id = None
                await self._release_slot()
                # Nothing runs upstream for the task now: a resumed attempt must not poll
                # the abandoned job, and the tenant may cancel while it waits.
                await self._record(route, None, can_cancel=True)
                next_route = await self._next_route(entry, [*tried, *spent])
                if next_route is None:
                    if not exc.retryable:
                        raise
                    if not exc.rate_limited:
                        rounds += 1
                        if rounds >= SUBMIT_ROUNDS:
                            raise
                    await self._sleep(self._round_pause(exc, rounds))
                    tried.clear()
                    next_route = await self._next_route(entry, spent)
                    if next_route is None:
                        raise
                route = self.route = next_route
        await self._circuit_outcome(route, failed=False)
        async with self.deps.engine.begin() as conn:
            done = await lifecycle.complete(
                conn, self.task_id, self.attempt, keys, self.settings.result_url_ttl_seconds
            )
        if not done:
            raise LeaseLost
        return f"completed: {len(keys)} image(s)"

    def _round_pause(self, exc: UpstreamError, rounds: int) -> float:
        if exc.rate_limited:
            return backoff_seconds(exc.retry_after)
        if exc.retry_after is not None:
            return exc.retry_after
        return self.settings.upstream_retry_base_seconds * (1 << max(rounds - 1, 0))

    async def _next_route(self, entry: ModelEntry, tried: list[str]) -> Route | None:
        """Another channel for the model, holding a slot on it; None when none is left.

        Waits (keeping the lease) while channels exist but none has a free slot
        or a closed circuit yet; the deadline ends the wait.
        """
        while True:
            routes = [
                r for r in await self.deps.directory.candidates(entry.id) if r.id not in tried
            ]
            if not routes:
                return None
            waits: list[float] = []
            for route in routes:
                wait = await self._circuit(route)
                if wait is None:
                    wait = await self._try_slot(route)
                    if wait is not None:
                        await self._unprobe(route)
                if wait is None:
                    await self._leave_all_but(route)
                    return route
                waits.append(wait)
            await self._sleep(max(min(waits), MIN_WAIT_SECONDS))

    async def _try_slot(self, route: Route) -> float | None:
        """Take a slot on ``route``: None when taken, else seconds to wait for one."""
        slots = self.deps.slots
        if slots is None:
            return None
        name = slot_name(self.settings, route)
        grant = await slots.acquire(
            name, self.holder, cap=route.max_concurrency, ticket_ms=self._ticket_ms
        )
        if not grant.acquired:
            self._lines.add(name)
            return grant.wait_seconds
        self._slot = name
        return None

    async def _leave_all_but(self, route: Route) -> None:
        """Granted on ``route``: leave the lines of the others."""
        keep = slot_name(self.settings, route)
        if self.deps.slots is not None:
            for name in self._lines - {keep}:
                await self.deps.slots.release(name, self.holder)
        self._lines.clear()

    async def _generate_on(
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
            self._check_deadline()  # never pay for a generation the task cannot wait for
            await self._record(route, None, can_cancel)
            submitted = await self._call(
                route, "submit", lambda: provider.submit(route.upstream_model(entry), request)
            )
            if submitted.job_id is None:
                assert submitted.state is not None
                return submitted.state
            job_id = submitted.job_id
            try:
                await self._record(route, job_id, can_cancel, progress=10)
            except LeaseLost:
                # Cancelled (or taken over) while the upstream took the job: stop it there.
                if provider.supports_cancel:
                    await self._cancel_quietly(route, job_id)
                raise
        return await self._poll(route, job_id)

    async def _record(
        self, route: Route, job_id: str | None, can_cancel: bool, progress: int | None = None
    ) -> None:
        async with self.deps.engine.begin() as conn:
            alive = await lifecycle.record_route(
                conn,
                self.task_id,
                self.attempt,
                self.settings.lease_seconds,
                channel_id=route.id,
                upstream_job_id=job_id,
                can_cancel=can_cancel,
            )
            if alive and progress is not None:
                await lifecycle.heartbeat(
                    conn, self.task_id, self.attempt, self.settings.lease_seconds, progress=progress
                )
        if not alive:
            raise LeaseLost
        if self._slot is not None and self.deps.slots is not None:
            await self.deps.slots.renew(self._slot, self.holder)
        self._last_beat = time.monotonic()

    async def _cancel_quietly(self, route: Route, job_id: str) -> None:
        try:
            await self._call(route, "cancel", lambda: route.provider.cancel(job_id))
        except UpstreamError as exc:
            logger.info("task %s: upstream cancel failed: %s", self.task_id, exc.message)

    async def _call(self, route: Route, phase: str, call: Callable[[], Awaitable[T]]) -> T:
        """One upstream call, timed and counted by channel, phase and outcome."""
        started = time.monotonic()
        outcome = "ok"
        # A call may outlast a lease (a synchronous generation): renew it meanwhile.
        keep_alive = asyncio.create_task(self._keep_alive())
        try:
            return await call()
        except UpstreamError as exc:
            outcome = exc.outcome
            raise
        finally:
            keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeaseLost):
                await keep_alive
            metrics.observe_upstream(
                route.adapter, route.name, phase, outcome, time.monotonic() - started
            )

    async def _keep_alive(self) -> None:
        """Renew the lease and slot every third of a lease until cancelled.

        A lost lease ends the renewing; the run's next write finds it lost.
        """
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            await self._maybe_beat(None)

    def _check_deadline(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded
        return remaining

    async def _beat(self, *, progress: int | None = None) -> None:
        async with self.deps.engine.begin() as conn:
            alive = await lifecycle.heartbeat(
                conn,
                self.task_id,
                self.attempt,
                self.settings.lease_seconds,
                progress=progress,
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

    async def _back_off(self, route: Route, exc: UpstreamError) -> float:
        """The channel said 429: hold back every worker on it; returns the wait."""
        if self.deps.slots is None:
            return backoff_seconds(exc.retry_after)
        return await self.deps.slots.back_off(slot_name(self.settings, route), exc.retry_after)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, keeping the lease alive, and give up at the deadline."""
        end = time.monotonic() + min(seconds, self._check_deadline())
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.settings.lease_seconds / 3))
            await self._maybe_beat(None)
        self._check_deadline()

    async def _poll(self, route: Route, job_id: str) -> JobState:
        failures = 0
        pause = self.settings.poll_interval_seconds
        while True:
            await self._sleep(pause)
            pause = self.settings.poll_interval_seconds
            try:
                state = await self._call(route, "poll", lambda: route.provider.poll(job_id))
            except UpstreamError as exc:
                if exc.rate_limited:
                    pause = max(pause, await self._back_off(route, exc))
                    continue
                failures += 1
                if not exc.retryable or failures >= MAX_POLL_FAILURES:
                    raise
                continue
            failures = 0
            if state.status in ("completed", "failed", "cancelled"):
                return state
            await self._maybe_beat(state.progress)

    async def _store(self, route: Route, state: JobState) -> list[str]:
        """Check and store the results, inline (``state.images``) or linked (``state.urls``)."""
        settings = self.settings
        source = ImageSource(
            client=self.deps.http,
            trusted_host=route.endpoint.host,
            max_bytes=settings.max_image_bytes,
            timeout=settings.upstream_timeout_seconds,
            allowed_hosts=self.deps.image_allowed_hosts,
            ca_bundle=settings.callback_ca_bundle,
        )
        keys = []
        images: list[bytes | str] = [*state.images, *state.urls]
        for index, item in enumerate(images):
            self._check_deadline()
            if isinstance(item, bytes):
                data, ext = image_of(item, settings.max_image_bytes)
            else:
                data, ext = await self._call(route, "download", partial(fetch_image, source, item))
            key = f"{self.task_id}/{index}.{ext}"
            await self.deps.storage.put(key, data)
            keys.append(key)
            await self._maybe_beat(90)
        return keys

    async def _hand_back(self) -> None:
        try:
            async with self.deps.engine.begin() as conn:
                handed = await lifecycle.hand_back(conn, self.task_id, self.attempt)
        except Exception:
            # The lease runs out on its own; the reconciler then hands the task on.
            logger.exception("task %s: could not hand the task back", self.task_id)
            return
        if handed:
            logger.info("task %s: handed back at shutdown", self.task_id)

    async def _fail(self, code: str, message: str) -> None:
        async with self.deps.engine.begin() as conn:
            failed = await lifecycle.fail(conn, self.task_id, self.attempt, code, message)
        if not failed:
            # Cancelled, or another attempt owns it: nothing of this run is recorded.
            self.callback_url = None
            raise LeaseLost


async def generate_task(ctx: dict[str, Any], task_id: str, attempt: int) -> str:
    """arq job: run one attempt of one task (see the module docstring)."""
    deps: WorkerDeps = ctx["deps"]
    with logs.scope():
        # Every line of this job names the task, and the request that submitted it.
        logs.bind(task_id=task_id)
        run = GenerationRun(deps, task_id, attempt)
        outcome = await run.execute()
        logger.info("task %s attempt %d: %s", task_id, attempt, outcome)
        if run.callback_url and outcome.startswith(("completed", "failed")):
            # The delivery row was committed with the task's end; queue its first attempt
            # now (the callback reconciler would otherwise find it, later).
            await enqueue_for_task(ctx["redis"], deps.settings, deps.engine, task_id)
        return outcome


async def cancel_upstream(
    ctx: dict[str, Any], task_id: str, channel_id: str, upstream_job_id: str
) -> str:
    """arq job: cancel a cancelled task's job at its upstream (best effort)."""
    deps: WorkerDeps = ctx["deps"]
    route = await deps.directory.get(channel_id)
    if route is None or not route.provider.supports_cancel:
        return "skipped: channel gone or cannot cancel"
    try:
        await route.provider.cancel(upstream_job_id)
    except UpstreamError as exc:
        logger.info("task %s: upstream cancel failed: %s", task_id, exc.message)
        return f"failed: {exc.code}"
    return "cancelled upstream"
