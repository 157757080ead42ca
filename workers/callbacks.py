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

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway import logs, metrics, outbound
from gateway.callbacks import service as callbacks
from gateway.db import utcnow
from gateway.queue import enqueue_callback
from gateway.settings import Settings
from gateway.storage import UrlSigner
from gateway.tasks.models import Task
from gateway.tenants.models import Tenant

logger = logging.getLogger("tollgate.callbacks")

BATCH = 500


@dataclass
class CallbackDeps:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    signer: UrlSigner
    resolver: outbound.Resolver | None = None  # tests inject one; None: the system's
    _http: outbound.GuardedClient | None = field(default=None, init=False)

    @property
    def http(self) -> outbound.GuardedClient:
        """Connections kept alive per receiver, every request still checked; built on first use
        (after startup, so a resolver a test sets on the deps is the one used)."""
        if self._http is None:
            self._http = outbound.GuardedClient(
                resolver=self.resolver,
                allowed_hosts=frozenset(self.settings.outbound_allowed_hosts),
                ca_bundle=self.settings.outbound_ca_bundle,
            )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        await self.engine.dispose()


async def deliver_callback(ctx: dict[str, Any], delivery_id: str, number: int) -> str:
    with logs.scope():
        return await _deliver(ctx, delivery_id, number)


async def _deliver(ctx: dict[str, Any], delivery_id: str, number: int) -> str:
    deps: CallbackDeps = ctx["callback_deps"]
    settings = deps.settings
    # The claim is one statement, atomic by itself, and the task's read one more: two
    # round trips with no BEGIN or COMMIT (eight before). The claim commits before the
    # POST is sent, so a worker that dies mid-attempt leaves the reconciler its trace.
    async with deps.engine.connect() as plain:
        conn = await plain.execution_options(isolation_level="AUTOCOMMIT")
        claimed = await callbacks.claim_attempt(
            conn, delivery_id, number, settings.callback_timeout_seconds
        )
        # No round trip under autocommit; it runs the after-commit hooks (a give-up's metric).
        await conn.commit()
        if claimed is None:
            return "skipped: not due"
        async with AsyncSession(bind=conn) as session:
            task, secret = (
                await session.exec(
                    select(Task, col(Tenant.webhook_secret))
                    .join(Tenant, col(Tenant.id) == col(Task.tenant_id))
                    .where(col(Task.id) == claimed.task_id, col(Tenant.id) == claimed.tenant_id)
                )
            ).one()
    # The lines below name the task and the request that submitted it.
    logs.bind(task_id=task.id, request_id=task.request_id)
    body = callbacks.callback_body(task, deps.signer)
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "Tollgate-Webhooks/1",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": callbacks.sign(secret, delivery_id, timestamp, body),
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
    duration_ms = int((time.monotonic() - began) * 1000)
    # One statement, atomic by itself: no BEGIN and COMMIT round trips around it.
    async with deps.engine.connect() as plain:
        conn = await plain.execution_options(isolation_level="AUTOCOMMIT")
        state = await callbacks.record_attempt(
            conn,
            delivery_id,
            claimed,
            started_at=started_at,
            duration_ms=duration_ms,
            status_code=status_code,
            error=error,
        )
    metrics.callback_attempted(delivered=state == "delivered", gave_up=state == "failed")
    if state == "pending":
        await enqueue_callback(
            ctx["redis"],
            settings.callback_queue_name,
            delivery_id,
            number + 1,
            delay=claimed.gap_seconds,
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
