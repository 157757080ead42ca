"""One tenant's submits reserved together: one database call for what waits (ADR 0007).

Every submit reserves its credits in PostgreSQL: an Idempotency-Key claim, the task row,
the ledger's hold, the tenant's held credits and tasks in flight, the key's spend. One
call per submit (``tollgate_submit``, migration 0007) wrote the tenant's row once per
submit, so a busy tenant's submits queued on that row's lock, one commit each, and left a
row version each. ``Reservations`` sends the submits of one tenant that are waiting in
one call of ``tollgate_submit_batch`` (migration 0015): the tenant's row and its keys'
spend rows are locked, read and written once for all of them, in one transaction. While
that call is out, the tenant's next submits gather; a lone submit is sent at once (through
``tollgate_submit``, which costs PostgreSQL less for one), and under load the calls grow
by themselves.

Rules:

- Each submit is decided on its own, in arrival order, as ``tollgate_submit`` would
  decide it after the ones before it: its Idempotency-Key claim, then the cap on tasks in
  flight, then the tenant's free credits, then the key's budgets. A refusal refuses that
  submit only, and leaves nothing of it.
- At most one call per tenant is out from a process; tenants do not wait for each other.
- Two submits with one Idempotency-Key never share a call: the later one goes in the
  next, where it finds the first's task (or, if the first was refused, makes its own), as
  it would have waited on the first's claim.
- A call that fails (a spend row another process created under it, or any error) is
  retried submit by submit through ``tollgate_submit``, so one bad submit fails alone
  and the rest are decided as before.
- A caller that stops waiting (a client gone) is skipped when its answer comes; its
  submit still happened, as one already sent alone would have.
"""

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.tasks.service import NewTask

logger = logging.getLogger("tollgate.tasks")

MAX_BATCH = 64  # submits in one call; more wait for the next

# What a reservation answers: 'created', 'duplicate:<task id>', 'conflict', or a refusal:
# 'TG402' (credits), 'TG429' (tasks in flight), 'TGBUD:<period 1-3>,<budget>,<spent>'.
Outcome = str

# The two functions take the same 21 arguments, in the same order: one submit's values
# (``_arguments``), or the tenant's id and then an array of each other argument's.
SUBMIT = "SELECT tollgate_submit(" + ", ".join(f"${n}" for n in range(1, 22)) + ")"
SUBMIT_BATCH = "SELECT tollgate_submit_batch(" + ", ".join(f"${n}" for n in range(1, 22)) + ")"
_TENANT = 1  # the tenant's place among the arguments


@dataclass(frozen=True, slots=True)
class Reservation:
    """A submit to reserve: the task, the tenant's cap on tasks in flight (0: none), the
    key's budget periods and budgets (``limits.spend_periods``), and its
    Idempotency-Key with the request's fingerprint."""

    task: "NewTask"
    cap: int
    periods: Sequence[str]
    budgets: Sequence[int | None]
    idempotency_key: str | None
    fingerprint: str | None


_Waiting = list[tuple[Reservation, asyncio.Future[Outcome]]]  # submits and their answers


class Reservations:
    def __init__(self, pg: Any, max_batch: int = MAX_BATCH) -> None:
        self._pg = pg  # asyncpg.Pool (untyped): the hot paths' pool
        self._max = max_batch
        self._waiting: dict[str, _Waiting] = {}
        self._senders: set[asyncio.Task[None]] = set()
        self.calls = 0  # database calls made (tests, profiling)

    async def reserve(self, reservation: Reservation) -> Outcome:
        """Reserve one submit, in one call with its tenant's other waiting submits."""
        answer: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        tenant_id = reservation.task.tenant_id
        waiting = self._waiting.get(tenant_id)
        if waiting is not None:
            waiting.append((reservation, answer))
        else:
            self._waiting[tenant_id] = [(reservation, answer)]
            sender = asyncio.create_task(self._send(tenant_id), name="submit-reservations")
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await answer

    async def _send(self, tenant_id: str) -> None:
        waiting = self._waiting[tenant_id]
        batch: _Waiting = []
        try:
            while waiting:
                batch = self._take(waiting)
                outcomes = await self._call(batch)
                for (_, answer), outcome in zip(batch, outcomes, strict=True):
                    if answer.done():  # its caller stopped waiting
                        continue
                    if isinstance(outcome, BaseException):
                        answer.set_exception(outcome)
                    else:
                        answer.set_result(outcome)
        finally:  # cancelled at shutdown (a call out is cancelled with it): no caller hangs
            _cancel_all(batch + waiting)
            self._waiting.pop(tenant_id, None)

    def _take(self, waiting: _Waiting) -> _Waiting:
        """The next call's submits, in order; a second one with the same Idempotency-Key,
        and those past ``max_batch``, stay for the one after."""
        batch: _Waiting = []
        later: _Waiting = []
        keys: set[str] = set()
        for entry in waiting:
            key = entry[0].idempotency_key
            if len(batch) >= self._max or (key is not None and key in keys):
                later.append(entry)
                continue
            batch.append(entry)
            if key is not None:
                keys.add(key)
        waiting[:] = later
        return batch

    async def _call(self, batch: _Waiting) -> list[Outcome | BaseException]:
        self.calls += 1
        items = [reservation for reservation, _ in batch]
        if len(items) == 1:  # alone, the one-submit function costs PostgreSQL less
            return [await self._one(items[0])]
        try:
            outcomes: list[Outcome] = await self._pg.fetchval(SUBMIT_BATCH, *_columns(items))
            return list(outcomes)
        except Exception as exc:
            logger.warning(
                "reserving %d submits together failed (%s); reserving them one by one",
                len(items),
                type(exc).__name__,
            )
        return [await self._one(item) for item in items]

    async def _one(self, item: Reservation) -> Outcome | BaseException:
        """One submit through ``tollgate_submit``, its refusal as the batch answers it."""
        try:
            outcome: Outcome = await self._pg.fetchval(SUBMIT, *_arguments(item))
        except Exception as exc:  # asyncpg's errors carry the function's SQLSTATE
            state = getattr(exc, "sqlstate", None)
            if state in ("TG402", "TG429"):
                return str(state)
            if state == "TGBUD":
                return f"TGBUD:{getattr(exc, 'detail', '')}"
            return exc
        return outcome

    async def close(self) -> None:
        """Stop sending: a call out is cancelled (its transaction rolls back) and every
        submit still waiting is cancelled, not left hanging."""
        for sender in list(self._senders):
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        for waiting in self._waiting.values():  # a sender cancelled before it began
            _cancel_all(waiting)
        self._waiting.clear()


def _cancel_all(entries: _Waiting) -> None:
    for _, answer in entries:
        if not answer.done():
            answer.cancel()


def _arguments(item: Reservation) -> list[Any]:
    """``tollgate_submit``'s arguments for one submit."""
    task = item.task
    return [
        task.id,
        task.tenant_id,
        task.api_key_id,
        task.model,
        task.provider,
        task.request,
        task.quote,
        task.billing_rule,
        task.user_group,
        task.credits_reserved_micros,
        task.estimated_seconds,
        task.can_cancel,
        task.callback_url,
        task.api,
        task.request_id,
        task.created_at,
        item.cap,
        list(item.periods),
        list(item.budgets),
        item.idempotency_key,
        item.fingerprint,
    ]


def _columns(items: list[Reservation]) -> list[Any]:
    """``tollgate_submit_batch``'s arguments: the tenant's id (one tenant a call), then
    each other argument of ``tollgate_submit`` as an array, one element per submit."""
    columns = [list(column) for column in zip(*map(_arguments, items), strict=True)]
    return [items[0].task.tenant_id, *columns[:_TENANT], *columns[_TENANT + 1 :]]
