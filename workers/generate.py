"""The generation job: one task, from its upstream call to its stored results.

Jobs may run more than once (arq delivers at least once, and the reconciler
re-queues a task whose worker went silent). The job is safe to repeat:

- it re-reads the task and claims it for its own ``attempt``; a job for an
  older attempt, or for a task already final, does nothing;
- the channel and upstream job id are recorded as soon as the upstream gives
  one, so a re-run resumes polling that job instead of paying for a second
  generation (``workers/upstream_calls.py``);
- results are stored under fixed keys (``<task>/<index>.<ext>``), so a re-run
  overwrites rather than adds, and the task row names them only once it
  completes;
- every write is fenced by ``attempt`` (``gateway/tasks/lifecycle.py``).

A run, in order: a slot on the first channel that admits it
(``workers/admission.py``; refused everywhere, the run parks in the lines and
ends, and the slot handed to it later queues its job again),
the claim and its lease and deadline (``workers/lease.py``), the generation
with failover across channels (``workers/failover.py``), then the task's end:
completed, or failed with the error that ended it.

Shutdown: a worker stopped with SIGTERM stops taking jobs and lets running
ones finish for ``worker_shutdown_grace_seconds``; a job still running then is
cancelled and hands its task back (its lease ends at once), and arq queues the
job again, so another worker resumes the same upstream job without waiting
for the lease to run out. Nothing is lost. An asynchronous upstream job is
resumed, never generated twice; a synchronous generation cut off mid-call has
no job to resume and is submitted again, so keep the grace period at least
``upstream_timeout_seconds`` where synchronous channels serve.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from arq.worker import Retry
from redis.exceptions import RedisError

from gateway import logs, metrics
from gateway.tasks import lifecycle
from gateway.tasks.models import OPEN_STATES
from pricing.quote import upstream_cost
from pricing.request import ImageRequest
from workers.admission import Admission
from workers.deps import WorkerDeps
from workers.failover import Failover
from workers.lease import DeadlineExceeded, Lease, LeaseLost
from workers.outage import is_database_outage, is_redis_outage
from workers.providers.base import UpstreamError
from workers.result_store import ResultsNotStored
from workers.routing import Route
from workers.run_end import RunEnd, record_run_end
from workers.upstream_calls import UpstreamCalls
from workers.upstream_slots import MIN_WAIT_SECONDS

logger = logging.getLogger("tollgate.generate")

# What routing needs of a task a run must read first (one statement, no transaction).
_PEEK = (
    "SELECT model, status, attempt, upstream_job_id, channel_id, created_at FROM tasks"
    " WHERE id = $1"
)

SKIPPED = "skipped: task final or owned by another attempt"
PARKED = "parked: waits in the line for an upstream slot"


@dataclass(frozen=True, slots=True)
class Peeked:
    model: str
    status: str
    attempt: int
    upstream_job_id: str | None
    channel_id: str | None
    ticket_ms: int  # the task's submission (ms): its place in the channels' lines


class GenerationRun:
    """One attempt of one task: admission, claim, failover, the task's end."""

    def __init__(self, deps: WorkerDeps, task_id: str, attempt: int) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.task_id = task_id
        self.attempt = attempt
        self.admission = Admission(deps, holder=f"{task_id}:{attempt}")
        self.calls: UpstreamCalls | None = None  # once the task is claimed
        self.lease = Lease(deps, task_id, attempt, self.admission)
        self.route: Route | None = None  # the first channel this run works on
        self.delivery_id: str | None = None  # the callback delivery its end recorded
        self.job_time: tuple[str, float] | None = None  # (model, seconds): images stored
        self.live = False  # its liveness record is made and not yet removed
        self.fresh = False  # the run did not read the task before its slot

    async def execute(self, fresh: tuple[str, int] | None = None) -> str:
        """``fresh``: the task's (model, ticket), carried by a first delivery of a job that
        knows its task runs no upstream job (see ``generate_task``): the run reads nothing
        from PostgreSQL before it has a slot, and its claim checks the task."""
        self.fresh = fresh is not None
        if fresh is not None:
            task: Peeked | None = Peeked(fresh[0], "pending", self.attempt, None, None, fresh[1])
        else:
            task = await self._peek()
        if task is None or task.status not in OPEN_STATES or task.attempt != self.attempt:
            if task is not None:  # it may have waited in the lines
                await self.admission.leave_lines(await self.deps.directory.candidates(task.model))
            return SKIPPED
        routes = await self._ordered_routes(task)
        shared = False
        if routes:
            entered = await self.admission.enter_first(
                routes,
                ticket_ms=task.ticket_ms,
                running_on=task.channel_id if task.upstream_job_id is not None else None,
                model=task.model,
            )
            if entered is None:
                return PARKED
            self.route, shared = entered
        try:
            return await self._claim_and_run(shared, task.model)
        except Exception as exc:
            if is_database_outage(exc) or is_redis_outage(exc):
                # arq runs the job again: its upstream job may run on meanwhile, so the
                # slot stays held until the run takes it back or its lease ends. The
                # lease ends as soon as PostgreSQL answers, for that run to claim the
                # task at once rather than when the lease runs out.
                self.admission.forget_slot()
                await self.lease.hand_back_after_outage()
            raise
        finally:
            await self.admission.leave()

    async def _peek(self) -> Peeked | None:
        """The task as far as routing needs it; None if there is no such task."""
        rows = await self.deps.statements.fetch(_PEEK, self.task_id)
        if not rows:
            return None
        model, status, attempt, job_id, channel_id, created_at = rows[0]
        ticket_ms = int(created_at.timestamp() * 1000)
        return Peeked(model, status, attempt, job_id, channel_id, ticket_ms)

    async def _ordered_routes(self, task: Peeked) -> list[Route]:
        """The channels to try: the one a running upstream job lives on first."""
        routes = await self.deps.directory.candidates(task.model)
        if task.upstream_job_id and task.channel_id:
            running = await self.deps.directory.get(task.channel_id)
            if running is not None:
                routes = [running, *(r for r in routes if r.id != running.id)]
        return routes

    async def _claim_and_run(self, shared_slot: bool, model: str) -> str:
        # The claim records the channel as the first submit's ``record_route`` would.
        route, entry = self.route, self.deps.catalog.model(model)
        can_cancel = bool(route and entry and entry.can_cancel and route.provider.supports_cancel)
        claimed = await lifecycle.claim(
            self.deps.statements,
            self.task_id,
            self.attempt,
            self.settings.lease_seconds,
            channel_id=route.id if route is not None else None,
            can_cancel=can_cancel,
        )
        if claimed is None:
            if shared_slot:
                self.admission.forget_slot()
            return SKIPPED
        if route is not None and claimed.upstream_job_id is None and claimed.model == model:
            self.lease.claimed_route = route.id
        logs.bind(request_id=claimed.request_id)
        self.lease.start(claimed.created_at)
        liveness = self.deps.liveness
        if liveness is not None:
            # If this worker dies, another hands the task on within seconds. The record
            # is removed with the run's other ends (``workers/run_end.py``), or below when
            # the run raises.
            await _quietly(liveness.running(self.admission.holder))
            self.live = True
        ended = False  # returned: the caller removes the record with the run's other ends
        try:
            outcome = await self._run_to_an_end(claimed)
            ended = True
            return outcome
        except asyncio.CancelledError:
            # The worker is shutting down past its grace period (arq re-queues the job).
            await asyncio.shield(self.lease.hand_back())
            raise
        except LeaseLost:
            ended = True
            return "stopped: lease lost to another attempt"
        finally:
            if liveness is not None and not ended:
                await asyncio.shield(_quietly(liveness.done(self.admission.holder)))
                self.live = False

    async def _run_to_an_end(self, claimed: lifecycle.Claimed) -> str:
        """Run the task; a deadline or an upstream error that ends it fails it."""
        try:
            return await self._run(claimed)
        except DeadlineExceeded:
            deadline = self.settings.task_deadline_seconds
            await self._fail("timeout", f"The generation did not finish within {deadline} seconds")
            # This run ended the task: the job it was polling is given up, and cancelled.
            if self.calls is not None and self.calls.polling is not None:
                await self.calls.abandon(*self.calls.polling, "deadline")
            return "failed: deadline"
        except UpstreamError as exc:
            await self._fail(exc.code, exc.message)
            return f"failed: {exc.code}"
        except ResultsNotStored:
            await self._fail(
                "storage_unavailable", "The images were generated but could not be stored"
            )
            return "failed: storage_unavailable"

    async def _run(self, claimed: lifecycle.Claimed) -> str:
        entry = self.deps.catalog.model(claimed.model)
        route = self.route
        if entry is None or route is None:
            await self._fail("no_upstream", f"No upstream is configured for model {claimed.model}")
            return "failed: no upstream"
        if self.fresh and claimed.upstream_job_id is not None and claimed.channel_id != route.id:
            # A run that did not read the task, yet its upstream job runs on another channel
            # (a delivery that took a slot elsewhere died): hand the task back and run
            # again, reading it first, to resume that job where it runs.
            await self.lease.hand_back()
            raise Retry(defer=MIN_WAIT_SECONDS)
        request = ImageRequest.from_json(claimed.request)
        job_id = claimed.upstream_job_id if claimed.channel_id == route.id else None
        calls = UpstreamCalls(self.deps, self.task_id, self.admission, self.lease)
        self.calls = calls
        began = time.monotonic()
        failover = Failover(calls)
        stored = await failover.generate(route, entry, request, job_id)
        # The upstream job's time, images stored: gateways estimate backlogs from it.
        self.job_time = (claimed.model, time.monotonic() - began)
        made_by = failover.route or route
        # The cost of the channel that made the images: its own, or the catalogue's.
        cost = upstream_cost(claimed.quote, len(stored), made_by.costs.get(entry.id), request)
        done = await lifecycle.complete(
            self.deps.statements,
            self.task_id,
            self.attempt,
            [result.key for result in stored],
            self.settings.result_url_ttl_seconds,
            sizes=[(result.width, result.height) for result in stored],
            cost=cost,
            channel_id=made_by.id,
            quote=claimed.quote,
        )
        if done is None:
            raise LeaseLost
        self.delivery_id = done.delivery_id
        return f"completed: {len(stored)} image(s)"

    async def _fail(self, code: str, message: str) -> None:
        failed = await lifecycle.fail(
            self.deps.statements, self.task_id, self.attempt, code, message
        )
        if failed is None:
            # Cancelled, or another attempt owns it: nothing of this run is recorded.
            raise LeaseLost
        self.delivery_id = failed.delivery_id


async def _quietly(call: Awaitable[None]) -> None:
    """A liveness record: one that Redis misses leaves the task to its lease."""
    try:
        await call
    except (RedisError, OSError) as exc:
        logger.debug("liveness not recorded: %s", exc)


async def generate_task(
    ctx: dict[str, Any],
    task_id: str,
    attempt: int,
    model: str | None = None,
    ticket_ms: int | None = None,
) -> str:
    """arq job: run one attempt of one task (see the module docstring).

    ``model`` and ``ticket_ms`` (the task's submission, ms) come with a just-submitted
    task's job and with wake-up jobs: on its first delivery such a job's task runs no
    upstream job yet, so the run takes its slot (or parks) without reading the task, and
    the claim checks it. A job delivered again (a worker died, a circuit was open), or
    queued without them (the reconciler's, older gateways'), reads the task first.
    """
    deps: WorkerDeps = ctx["deps"]
    fresh = None
    if model is not None and ticket_ms is not None and ctx.get("job_try", 1) == 1:
        fresh = (model, ticket_ms)
    with logs.scope():
        # Every line of this job names the task, and the request that submitted it.
        logs.bind(task_id=task_id)
        run = GenerationRun(deps, task_id, attempt)
        outcome = await run.execute(fresh)
        # Parking is routine under a backlog: one line per task at info, not per park.
        log = logger.debug if outcome == PARKED else logger.info
        log("task %s attempt %d: %s", task_id, attempt, outcome)
        metrics.generation_ran(outcome)
        # One round trip, with arq's finish of the job: the liveness record goes, the job
        # time is pushed, the circuits of the channels that served it close, and the
        # delivery committed with the task's end has its first attempt queued (the
        # callback reconciler would otherwise find it, later).
        settings = deps.settings
        model, seconds = run.job_time if run.job_time is not None else ("", None)
        end = RunEnd(
            queue_name=settings.queue_name,
            callback_queue_name=settings.callback_queue_name,
            model=model,
            holder=run.admission.holder if run.live else None,
            job_seconds=seconds,
            delivery_id=run.delivery_id,
            circuit_keys=tuple(run.admission.served),
        )
        run_ends, job_id = ctx.get("run_ends"), ctx.get("job_id")
        if run_ends is not None and job_id is not None:
            run_ends[job_id] = end  # written with arq's finish of this job, one round trip
        elif ctx.get("redis") is not None:
            await record_run_end(ctx["redis"], end)
        return outcome


async def cancel_upstream(
    ctx: dict[str, Any],
    task_id: str,
    channel_id: str,
    upstream_job_id: str,
    reason: str = "cancel",
) -> str:
    """arq job: cancel an ended task's job at its upstream (best effort), and count it
    abandoned. ``reason``: ``cancel`` (the tenant cancelled) or ``deadline`` (the sweeper
    failed the task while its job ran)."""
    deps: WorkerDeps = ctx["deps"]
    route = await deps.directory.get(channel_id)
    if route is None:
        return "skipped: channel gone"
    if not route.provider.supports_cancel:
        metrics.upstream_job_abandoned(route.adapter, route.name, reason, "unsupported")
        return "skipped: the channel cannot cancel"
    try:
        await route.provider.cancel(upstream_job_id)
    except UpstreamError as exc:
        logger.info("task %s: upstream cancel failed: %s", task_id, exc.message)
        metrics.upstream_job_abandoned(route.adapter, route.name, reason, "failed")
        return f"failed: {exc.code}"
    metrics.upstream_job_abandoned(route.adapter, route.name, reason, "confirmed")
    return "cancelled upstream"
