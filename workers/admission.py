"""Channel admission: whether a run may work on a channel now.

Two things admit a run to a channel, both shared by every worker through Redis:

- **Its circuit** (``workers/circuits.py``). An open circuit passes the channel
  over; a half-open one lets one run through as its probe. That run reports
  how the channel did (``record_outcome``), or gives the probe up
  (``give_up_probe``) when it does not use the channel after all, so that
  another task may probe it.
- **A slot** (``workers/upstream_slots.py``), under the channel's
  ``max_concurrency``. A refused run waits in the channel's line, placed by its
  task's submission time.

Upstream concurrency: a run takes a slot on its first channel before it claims
the task (``enter_first``). Refused everywhere, it parks: it leaves the task
pending, its places in the lines and a wake-up job with each, and ends. The
first line to hand it a slot queues that job (``workers/upstream_slots.py``),
so waiting holds no worker, polls nothing and fails nothing. Only a run whose
every channel has an open circuit (so it waits in no line) is run again later
by arq (``Retry``), after the circuit's cool-down. Moving to another channel
mid-run takes a slot there first (``admit_next``); the caller waits while
keeping the task's lease, asking again.

One ``Admission`` per run holds what the run has taken: at most one slot, the
lines it waits in, and the half-open probes it holds. ``leave()`` gives all of
it back, and a run calls it on every way out; a slot is renewed with the
task's lease (``renew_slot``; not within a third of a lease of its last renewal or
grant), so a killed worker's slot frees itself.
"""

import logging
import time

from arq.worker import Retry

from gateway.redis_keys import slot_name
from workers.deps import WorkerDeps
from workers.routing import Route
from workers.upstream_slots import MIN_WAIT_SECONDS, Grant, backoff_seconds

logger = logging.getLogger("tollgate.generate")


class Admission:
    """What one run holds on its channels: a slot, places in lines, probes."""

    def __init__(self, deps: WorkerDeps, holder: str) -> None:
        self._slots = deps.slots
        self._circuits = deps.circuits
        self._queue_name = deps.settings.queue_name
        self.holder = holder  # in the channels' slots and circuits: "<task>:<attempt>"
        self._ticket_ms = 0  # its place in a channel's line: the task's submission (ms)
        self._slot: str | None = None  # the slot this run holds, if any
        self._slot_renewed = 0.0  # when its lease was last set (monotonic)
        # A slot's lease set less than a third of a lease ago is not renewed again (the
        # lease's own rule): the beats right after a grant cost no round trip.
        self._renew_every = deps.settings.lease_seconds / 3
        self._lines: set[str] = set()  # lines this run waits in mid-run
        self._probes: set[str] = set()  # channels whose half-open probe this run holds
        # The circuit keys of the channels that served this run: deleted with its end.
        self.served: list[str] = []

    def _name(self, route: Route) -> str:
        return slot_name(self._queue_name, route.id)

    async def enter_first(
        self,
        routes: list[Route],
        *,
        ticket_ms: int,
        running_on: str | None,
        model: str | None = None,
    ) -> tuple[Route, bool] | None:
        """A slot on the first of ``routes`` that admits this run; None when the run
        parked in their lines (a slot handed to it queues its job again), or ``Retry``
        when every channel's circuit is open.

        ``running_on`` is the channel the task's upstream job already runs on: it
        is let in past its circuit and its cap (``upstream_slots``' resuming rule).
        Returns the channel and whether this holder had the slot already (another
        delivery of the same job may be running it). ``model``, when given, goes with
        the wake-up jobs (their runs need not read the task before their slot).
        """
        self._ticket_ms = ticket_ms
        if self._slots is None:
            return routes[0], False
        waits: list[float] = []
        parked = False
        for route in routes:
            grant = await self._enter(route, resuming=route.id == running_on, model=model)
            if grant.circuit_open:
                waits.append(grant.wait_seconds)
                continue
            if grant.acquired:
                self._slot = self._name(route)
                self._slot_renewed = time.monotonic()
                # It may wait in the other lines (parked there by an earlier run).
                if len(routes) > 1:
                    await self.leave_lines([r for r in routes if r.id != route.id])
                return route, grant.already_held
            await self.give_up_probe(route)
            parked = True
        if parked:
            logger.debug("%s parked in the lines of %d channel(s)", self.holder, len(routes))
            return None
        wait = max(min(waits), MIN_WAIT_SECONDS)
        logger.debug("%s waits %.2fs for a channel's circuit", self.holder, wait)
        raise Retry(defer=wait)

    async def _enter(self, route: Route, *, resuming: bool, model: str | None) -> Grant:
        """A slot on ``route`` or a place in its line, its circuit read in the same round
        trip (``UpstreamSlots.acquire``): open, nothing is taken (``Grant.circuit_open``);
        half-open, the circuit's probe decides first, as in ``admit_next``. ``resuming``:
        the task's upstream job runs on this channel, let in past its circuit."""
        assert self._slots is not None
        slots, name = self._slots, self._name(route)

        async def take(circuit: tuple[str, str] | None) -> Grant:
            return await slots.acquire(
                name,
                self.holder,
                cap=route.max_concurrency,
                ticket_ms=self._ticket_ms,
                running=resuming,
                model=model,
                circuit=circuit,
            )

        if resuming or self._circuits is None:
            return await take(None)
        grant = await take(self._circuits.state_keys(route.id))
        if not grant.circuit_half_open:
            return grant
        wait = await self._circuit_wait(route)
        if wait is not None:
            return Grant(acquired=False, wait_seconds=wait, circuit_open=True)
        return await take(None)  # this run holds the probe

    async def admit_next(self, routes: list[Route]) -> Route | float:
        """A slot on the first of ``routes`` that admits this run now, or seconds to wait.

        Granted, the run leaves the other lines it waits in; refused, it keeps
        its places for the next ask.
        """
        waits: list[float] = []
        for route in routes:
            wait = await self._circuit_wait(route)
            if wait is None:
                wait = await self._try_slot(route)
                if wait is not None:
                    await self.give_up_probe(route)
            if wait is None:
                await self._leave_joined_lines()
                return route
            waits.append(wait)
        return max(min(waits), MIN_WAIT_SECONDS)

    async def _circuit_wait(self, route: Route) -> float | None:
        """None if the channel's circuit lets this run through, else seconds to wait."""
        if self._circuits is None:
            return None
        state = await self._circuits.state(route.id, self.holder)
        if state.probing:
            self._probes.add(route.id)
        return state.retry_in if state.open else None

    async def _try_slot(self, route: Route) -> float | None:
        """Take a slot on ``route``: None when taken, else seconds to wait for one."""
        if self._slots is None:
            return None
        name = self._name(route)
        grant = await self._slots.acquire(
            name, self.holder, cap=route.max_concurrency, ticket_ms=self._ticket_ms, wake=False
        )
        if not grant.acquired:
            self._lines.add(name)
            return grant.wait_seconds
        self._slot = name
        self._slot_renewed = time.monotonic()
        return None

    async def give_up_probe(self, route: Route) -> None:
        """This run will not use the channel now: let another task probe it."""
        if route.id in self._probes and self._circuits is not None:
            self._probes.discard(route.id)
            await self._circuits.release_probe(route.id, self.holder)

    async def record_outcome(self, route: Route, *, failed: bool, at_once: bool = False) -> None:
        """The channel failed this run (counted against its circuit at once; ``at_once``
        opens it now) or served it: its circuit closes with the run's end, in the end's
        round trip (``served``; a run that raises past its end leaves the circuit as it
        was, a probe to lapse after its cool-down)."""
        if self._circuits is None:
            return
        self._probes.discard(route.id)
        if failed:
            await self._circuits.failure(route.id, route.name, at_once=at_once)
        else:
            self.served += self._circuits.success_keys(route.id)

    async def back_off(self, route: Route, retry_after: float | None) -> float:
        """The channel said 429: hold back every worker on it; returns the wait."""
        if self._slots is None:
            return backoff_seconds(retry_after)
        return await self._slots.back_off(self._name(route), retry_after)

    async def renew_slot(self) -> None:
        """Extend the slot this run holds by a lease (with the task's own lease)."""
        if self._slot is not None and self._slots is not None:
            if time.monotonic() - self._slot_renewed < self._renew_every:
                return
            await self._slots.renew(self._slot, self.holder)
            self._slot_renewed = time.monotonic()

    async def release_slot(self) -> None:
        """Give back the slot this run holds, if any."""
        if self._slot is not None and self._slots is not None:
            await self._slots.release(self._slot, self.holder)
        self._slot = None

    def forget_slot(self) -> None:
        """Another delivery of this job holds the task and, with it, this same slot:
        leave the slot to that delivery."""
        self._slot = None

    async def leave_lines(self, routes: list[Route]) -> None:
        """Leave the lines of ``routes`` (a run that will not ask them again)."""
        if self._slots is not None:
            for route in routes:
                await self._slots.release(self._name(route), self.holder)

    async def _leave_joined_lines(self) -> None:
        """Leave every line this run joined mid-run, but the one of the slot it holds."""
        if self._slots is not None:
            for name in self._lines - {self._slot}:
                await self._slots.release(name, self.holder)
        self._lines.clear()

    async def leave(self) -> None:
        """The run ends: give back its slot, its places in lines and its unused probes."""
        await self.release_slot()
        await self._leave_joined_lines()
        if self._circuits is not None:
            for channel in self._probes:
                await self._circuits.release_probe(channel, self.holder)
        self._probes.clear()
