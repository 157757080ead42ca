"""The callback worker: one attempt per job, retries by deferred jobs.

Runs on its own queue (``TOLLGATE_CALLBACK_QUEUE_NAME``), so a slow receiver
never delays generation. ``deliver_callback(delivery, number)`` claims attempt
``number`` (``gateway/callbacks/service.py``), POSTs the task's current object
through the SSRF guard (``gateway/outbound/``: HTTPS, resolved once, never an
internal address, TLS verified against the hostname, no redirects, no proxy),
records the outcome and, on failure, queues attempt ``number + 1`` after the
schedule's gap. A due retry lives in Redis as a deferred job, so it survives a
worker restart; if Redis loses it, ``reconcile_callbacks`` queues it again from
PostgreSQL.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway import logs, metrics, outbound
from gateway.callbacks import service as callbacks
from gateway.db import utcnow
from gateway.queue import enqueue_callback
from gateway.settings import Settings
from gateway.storage import UrlSigner

logger = logging.getLogger("tollgate.callbacks")

BATCH = 500

# A receiver's checked addresses serve its attempts for this long after the lookup (each
# attempt still goes only to checked addresses; a connection failure looks it up again).
ANSWER_SECONDS = 1.0

In = TypeVar("In")
Out = TypeVar("Out")


class Batches(Generic[In, Out]):
    """Calls that arrive while a batch is out go together in the next: one statement for many.

    A lone call is sent at once; under load the batches grow by themselves (up to
    ``limit``), as ``gateway/tasks/reads.py`` does for task reads. ``send`` answers
    a list of items with a list of results, in order; if it raises, every call of
    its batch raises that. A caller that stops waiting is skipped when the answer
    comes (its item was sent all the same).
    """

    def __init__(self, send: Callable[[list[In]], Awaitable[list[Out]]], limit: int) -> None:
        self._send = send
        self._limit = limit
        self._waiting: list[tuple[In, asyncio.Future[Out]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0  # sent (tests, profiling)

    async def __call__(self, item: In) -> Out:
        answer: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_waiting(), name="callback-batches")
        return await answer

    async def _send_waiting(self) -> None:
        while self._waiting:
            batch = self._waiting[: self._limit]
            self._waiting = self._waiting[self._limit :]
            self.batches += 1
            try:
                results = await self._send([item for item, _ in batch])
            except Exception as exc:  # every call of the batch fails with it
                for _, answer in batch:
                    if not answer.done():
                        answer.set_exception(exc)
                continue
            for (_, answer), result in zip(batch, results, strict=True):
                if not answer.done():
                    answer.set_result(result)

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        for _, answer in self._waiting:
            answer.cancel()
        self._waiting = []


@dataclass
class CallbackDeps:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    signer: UrlSigner
    resolver: outbound.Resolver | None = None  # tests inject one; None: the system's
    _http: outbound.GuardedClient | None = field(default=None, init=False)
    # The claims and the outcomes of the attempts in hand, each batch one statement.
    claims: "Batches[tuple[str, int], callbacks.Due | None]" = field(init=False)
    records: "Batches[callbacks.Outcome, str]" = field(init=False)

    def __post_init__(self) -> None:
        self.claims = Batches(self._claim, BATCH)
        self.records = Batches(self._record, BATCH)

    @property
    def http(self) -> outbound.GuardedClient:
        """Connections kept alive per receiver, every request still checked; built on first use
        (after startup, so a resolver a test sets on the deps is the one used)."""
        if self._http is None:
            self._http = outbound.GuardedClient(
                resolver=self.resolver,
                allowed_hosts=frozenset(self.settings.outbound_allowed_hosts),
                ca_bundle=self.settings.outbound_ca_bundle,
                answer_seconds=ANSWER_SECONDS,
            )
        return self._http

    async def _claim(self, wanted: list[tuple[str, int]]) -> list[callbacks.Due | None]:
        # One statement, atomic by itself: no BEGIN or COMMIT round trips. The claims
        # commit before any POST is sent, so a worker that dies mid-attempt leaves the
        # reconciler its trace.
        async with self.engine.connect() as plain:
            conn = await plain.execution_options(isolation_level="AUTOCOMMIT")
            due = await callbacks.claim_attempts(
                conn, wanted, self.settings.callback_timeout_seconds
            )
            # No round trip under autocommit; it runs the after-commit hooks (a give-up's metric).
            await conn.commit()
        return due

    async def _record(self, outcomes: list[callbacks.Outcome]) -> list[str]:
        async with self.engine.connect() as plain:
            conn = await plain.execution_options(isolation_level="AUTOCOMMIT")
            return await callbacks.record_attempts(conn, outcomes)

    async def aclose(self) -> None:
        await self.claims.close()
        await self.records.close()
        if self._http is not None:
            await self._http.aclose()
        await self.engine.dispose()


async def deliver_callback(ctx: dict[str, Any], delivery_id: str, number: int) -> str:
    with logs.scope():
        return await _deliver(ctx, delivery_id, number)


async def _deliver(ctx: dict[str, Any], delivery_id: str, number: int) -> str:
    deps: CallbackDeps = ctx["callback_deps"]
    settings = deps.settings
    # The claim, the task and the tenant's secret: one statement for the attempts in hand.
    due = await deps.claims((delivery_id, number))
    if due is None:
        return "skipped: not due"
    claimed = due.claimed
    # The lines below name the task and the request that submitted it.
    logs.bind(task_id=due.task.id, request_id=due.request_id)
    body = callbacks.callback_body(due.task, deps.signer)
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "Tollgate-Webhooks/1",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": callbacks.sign(due.secret, delivery_id, timestamp, body),
    }
    started_at = utcnow()
    began = time.monotonic()
    status_code: int | None = None
    error: str | None = None
    try:
        response = await deps.http.post(
            claimed.url, content=body, headers=headers, timeout=settings.callback_timeout_seconds
        )
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
    except outbound.ForbiddenAddress as exc:
        error = f"refused: {exc}"
    except Exception as exc:  # timeouts, connection and TLS errors: all retried
        error = f"{type(exc).__name__}: {exc}"[:500]
    answered = time.monotonic()
    duration_ms = int((answered - began) * 1000)
    # The attempt's row and the delivery's new state: one statement for the outcomes in hand.
    state = await deps.records(
        callbacks.Outcome(delivery_id, claimed, started_at, duration_ms, status_code, error)
    )
    metrics.callback_attempted(delivered=state == "delivered", gave_up=state == "failed")
    if state == "pending":
        # The gap counts from the answer: the time the record took is already part of it.
        await enqueue_callback(
            ctx["redis"],
            settings.callback_queue_name,
            delivery_id,
            number + 1,
            delay=max(0.001, claimed.gap_seconds - (time.monotonic() - answered)),
        )
    logger.info(
        "callback %s attempt %d: %s (%s)",
        delivery_id,
        number,
        state,
        error or status_code,
        extra={"delivery_id": delivery_id, "attempt": number, "outcome": state},
    )
    return state


async def reconcile_callbacks(ctx: dict[str, Any]) -> int:
    """Queue every pending delivery whose next attempt is overdue (lost job, lost Redis)."""
    deps: CallbackDeps = ctx["callback_deps"]
    async with deps.engine.begin() as conn:
        due = await callbacks.due_deliveries(conn, BATCH)
    queued = 0
    for delivery_id, number in due:
        if await enqueue_callback(
            ctx["redis"], deps.settings.callback_queue_name, delivery_id, number
        ):
            queued += 1
    return queued
