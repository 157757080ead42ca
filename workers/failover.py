"""Failover: a claimed task moves along its model's channels until one generates it.

Which channels may serve, and in which order, is ``workers/routing.py``'s
answer; whether a channel admits the task now (circuit, slot) is
``workers/admission.py``'s. This module decides what a failure on a channel
leads to (docs/channels.md):

- A retryable failure (connect error, timeout, 5xx, a body we cannot read, a
  poll that cannot go on) counts against the channel's circuit and moves the
  task to the next channel; a 401/403 (the channel's key refused) opens its
  circuit at once. A 429 backs the channel off for its Retry-After and moves on
  too; with no other channel the run waits it out and asks again, one request
  per Retry-After, until the waits add up to more than
  ``upstream_retry_after_cap_seconds``: then the channel is spent for the task,
  and with no other channel left the task fails ``upstream_rate_limited``.
  A final answer that is the channel's, not the
  request's (the job failed upstream, a result we cannot use), moves on and
  leaves that channel out of later rounds.
- When every channel has been tried, the run waits
  (``upstream_retry_base_seconds`` × 1, 2, 4, or the Retry-After) and starts a
  new round, ``SUBMIT_ROUNDS`` rounds at most; waiting out a 429 is not a round.
- A 4xx that is the request's fault ends the task at once.
- The task's deadline bounds everything: every wait keeps the lease and ends at
  the deadline (``workers/lease.py``).

Leaving a channel gives its slot back and records that nothing runs upstream
for the task any more: a resumed attempt must not poll the abandoned job, and
the tenant may cancel while the task waits.
"""

import logging

from pricing.catalog import ModelEntry
from pricing.request import ImageRequest
from workers.providers.base import UpstreamError, UpstreamRateLimited
from workers.routing import Route
from workers.upstream_calls import Stored, UpstreamCalls
from workers.upstream_slots import backoff_seconds

logger = logging.getLogger("tollgate.generate")

SUBMIT_ROUNDS = 4


class Failover:
    """One run's way through its model's channels."""

    def __init__(self, calls: UpstreamCalls) -> None:
        self._calls = calls
        self._admission = calls.admission
        self._lease = calls.lease
        self.route: Route | None = None  # the channel that made the results, once made

    async def generate(
        self, route: Route, entry: ModelEntry, request: ImageRequest, job_id: str | None
    ) -> list[Stored]:
        """Generate on ``route`` (resuming ``job_id``), failing over as the rules say.

        Returns the stored results; raises the ``UpstreamError`` that ends the task.
        """
        tried: list[str] = []  # channels tried in this round
        spent: list[str] = []  # channels that gave a final answer (job failed, bad result)
        rounds = 0
        cap = self._calls.deps.settings.upstream_retry_after_cap_seconds
        limited = 0.0  # seconds this run has waited out 429s
        while True:
            try:
                stored = await self._calls.generate_on(route, entry, request, job_id)
                break
            except UpstreamError as exc:
                if not (exc.retryable or exc.try_elsewhere):
                    raise
                await self._leave_channel(route, exc)
                # A 429 whose wait would pass the cap spends the channel for this task.
                over_cap = exc.rate_limited and limited + backoff_seconds(exc.retry_after) > cap
                (spent if exc.try_elsewhere or over_cap else tried).append(route.id)
                job_id = None
                next_route = await self._next_route(entry, [*tried, *spent])
                if next_route is None:
                    # Every channel has had its turn this round.
                    if over_cap:
                        raise UpstreamRateLimited(
                            "The upstream kept refusing with 429 (rate limited) for longer"
                            f" than {cap:g} seconds"
                        ) from None
                    if not exc.retryable:
                        raise
                    if not exc.rate_limited:
                        rounds += 1
                        if rounds >= SUBMIT_ROUNDS:
                            raise
                    pause = self._round_pause(exc, rounds)
                    if exc.rate_limited:
                        limited += pause
                    await self._lease.sleep(pause)
                    tried.clear()
                    next_route = await self._next_route(entry, spent)
                    if next_route is None:
                        raise
                route = next_route
        await self._admission.record_outcome(route, failed=False)
        self.route = route
        return stored

    async def _leave_channel(self, route: Route, exc: UpstreamError) -> None:
        """Count the failure against the channel (or back it off), give its slot back."""
        if exc.rate_limited:
            await self._admission.back_off(route, exc.retry_after)
            await self._admission.give_up_probe(route)
        else:
            await self._admission.record_outcome(route, failed=True, at_once=exc.opens_circuit)
        logger.info(
            "task %s: channel %s failed (%s); trying another",
            self._calls.task_id,
            route.name,
            exc.message,
        )
        await self._admission.release_slot()
        # Nothing runs upstream for the task now: a resumed attempt must not poll
        # the abandoned job, and the tenant may cancel while it waits.
        await self._lease.record_route(route.id, None, can_cancel=True)

    def _round_pause(self, exc: UpstreamError, rounds: int) -> float:
        if exc.rate_limited:
            return backoff_seconds(exc.retry_after)
        if exc.retry_after is not None:
            return exc.retry_after
        return self._calls.deps.settings.upstream_retry_base_seconds * (1 << max(rounds - 1, 0))

    async def _next_route(self, entry: ModelEntry, tried: list[str]) -> Route | None:
        """Another channel for the model, holding a slot on it; None when none is left.

        Waits (keeping the lease) while channels exist but none has a free slot
        or a closed circuit yet; the deadline ends the wait.
        """
        while True:
            routes = [
                r
                for r in await self._calls.deps.directory.candidates(entry.id)
                if r.id not in tried
            ]
            if not routes:
                return None
            admitted = await self._admission.admit_next(routes)
            if isinstance(admitted, Route):
                return admitted
            await self._lease.sleep(admitted)
