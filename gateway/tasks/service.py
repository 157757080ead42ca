"""Task records: create, read, render.

Services take the session first and never commit (the caller's unit of work does).
A tenant only sees its own tasks: another's task id is answered as an unknown one.

The two hot paths talk to PostgreSQL through the asyncpg pool (``Services.pg``)
instead, with statements prepared once per connection:

- **Submit** is one call of a database function, outside any explicit
  transaction, so that call is the whole transaction and one round trip: for each
  submit the idempotency key, the task row, the ledger's hold, the tenant's held
  credits and in-flight count, and the key's spend, or none of them. A lone submit
  calls ``tollgate_submit`` (migration 0007, ADR 0005); the submits of one tenant
  that wait together in this process share a call of ``tollgate_submit_batch``
  (migration 0015, ADR 0007; ``reservations.py``). The job is queued after the
  call returns (committed).
- **Read** is one indexed ``SELECT``. A finished task never changes (every write
  to it is fenced to an open status, ``lifecycle.py``), so its rendered body is
  kept per process (``FinishedTasks``) and served again without a query.

Over 450 lines because the submit's path (validation, the new task's record, the
reservation call) and the read's (the record, its rendering, the finished cache) are
one module's: each is read top to bottom in one place.
"""

import hashlib
import json
import logging
import secrets
import string
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import Table
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway import logs, metrics
from gateway.auth import Principal, require_active
from gateway.callback_urls import validate_callback_url
from gateway.db import get_or_404, utcnow
from gateway.errors import Conflict, InvalidRequest, ModelAccessDenied, NotFound
from gateway.ledger.service import InsufficientQuota
from gateway.limits import service as limits
from gateway.prices.book import Snapshot, build_snapshot
from gateway.queue import generation_call
from gateway.script_batch import ScriptBatch
from gateway.settings import Settings
from gateway.storage import UrlSigner
from gateway.tasks.models import FINAL_STATES, IdempotencyKey, Task, TaskStatus
from gateway.tasks.reservations import Reservation, Reservations
from gateway.tasks.schemas import ResultSize, TaskError, TaskInfo, TaskObject, Usage
from pricing.catalog import Catalog, ModelEntry
from pricing.money import credits_from_micros
from pricing.quote import Quote, quote
from pricing.request import ImageRequest, InvalidField, resolve_request

logger = logging.getLogger("tollgate.tasks")

idempotency_keys: Table = IdempotencyKey.__table__  # type: ignore[attr-defined]
MAX_IDEMPOTENCY_KEY = 255

_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_SPACE = 36**12


def new_task_id(now: datetime) -> str:
    """``task-unified-<unix seconds>-<12 random chars>``, the contract's id shape."""
    # One draw from the OS's generator, written in base 36 (12 digits: 62 bits).
    value = secrets.randbelow(_ID_SPACE)
    suffix = []
    for _ in range(12):
        value, digit = divmod(value, 36)
        suffix.append(_ID_ALPHABET[digit])
    return f"task-unified-{int(now.timestamp())}-{''.join(suffix)}"


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """What the API shows of a task, read by ``read_task`` (the columns of ``_READ``)."""

    id: str
    tenant_id: str
    model: str
    status: str
    progress: int
    billing_rule: str
    user_group: str
    credits_reserved_micros: int
    credits_charged_micros: int | None
    estimated_seconds: int
    can_cancel: bool
    results: list[str] | None
    result_sizes: list[list[int]] | None
    results_expire_at: datetime | None
    error_code: str | None
    error_message: str | None
    created_at: datetime
    attempt: int
    api: str


@dataclass(frozen=True, slots=True)
class NewTask(TaskRecord):
    """A task being submitted: what ``tollgate_submit`` stores besides what the API shows.
    A plain dataclass: building the ORM model cost a tenth of a submit's CPU."""

    api_key_id: str
    provider: str
    request: dict[str, Any]
    quote: dict[str, Any]
    callback_url: str | None
    request_id: str | None


TaskView = Task | TaskRecord


def build_task(
    *,
    tenant_id: str,
    api_key_id: str,
    user_group: str,
    entry: ModelEntry,
    request: ImageRequest,
    quote: Quote,
    callback_url: str | None,
    api: str = "unified",
    request_id: str | None = None,
) -> NewTask:
    now = utcnow()
    return NewTask(
        id=new_task_id(now),
        tenant_id=tenant_id,
        model=entry.id,
        status=TaskStatus.PENDING.value,
        progress=0,
        billing_rule=quote.billing_rule,
        user_group=user_group,
        credits_reserved_micros=quote.amount_micros,
        credits_charged_micros=None,
        estimated_seconds=entry.estimated_seconds,
        can_cancel=entry.can_cancel,
        results=None,
        result_sizes=None,
        results_expire_at=None,
        error_code=None,
        error_message=None,
        created_at=now,
        attempt=0,
        api=api,
        api_key_id=api_key_id,
        provider=entry.provider,
        request=request.to_json(),
        quote=quote.to_json(),
        callback_url=callback_url,
        request_id=request_id,
    )


@dataclass(frozen=True, slots=True)
class Submission:
    task: "TaskView"
    created: bool  # False: an Idempotency-Key retry answered with the task made before


def request_fingerprint(fields: dict[str, Any], callback_url: str | None) -> str:
    canonical = json.dumps({**fields, "callback_url": callback_url}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def submit_generation(
    pg: asyncpg.Pool,
    *,
    reservations: Reservations,
    catalog: Catalog,
    settings: Settings,
    principal: Principal,
    fields: dict[str, Any],
    webhook_url: str | None,
    idempotency_key: str | None,
    api: str = "unified",
    prices: Snapshot | None = None,
) -> Submission:
    """Validate, price, claim the idempotency key, record the task and hold its credits.

    Also enforces the tenant's cap on tasks in flight, the models the key may
    use and the key's budgets (``gateway/limits/service.py``).

    All in one database call, shared with the tenant's other waiting submits
    (``reservations.py``): if the hold fails (402) nothing of it remains. A retry with
    the same Idempotency-Key finds the first task; a concurrent one waits until the
    first commits.

    ``api`` is the front door the request came through ("unified", or "krea" from
    ``gateway/krea/``); it is recorded on the task and decides the shape of its
    callback. One key sent to both doors is a different request (409).
    """
    require_active(principal)  # a suspended tenant reads, but submits nothing
    for name, value in fields.items():
        if _contains_nul(value):
            # PostgreSQL text cannot hold U+0000; refuse it here rather than fail on insert.
            raise InvalidRequest(name, "must not contain NUL (\\u0000) characters")
    model_id = fields.pop("model")
    entry = catalog.model(model_id)
    if entry is None:
        raise InvalidRequest(
            "model", f"unknown model {model_id!r}; GET /v1/models lists the models you can use"
        )
    if not limits.check_model_access(principal, model_id):
        raise ModelAccessDenied(model_id)
    callback_url = fields.pop("callback_url", None)
    allowed = frozenset(settings.outbound_allowed_hosts)
    if callback_url is not None:
        validate_callback_url(callback_url, allowed_hosts=allowed)
    elif webhook_url is not None:
        callback_url = validate_callback_url(webhook_url, "X-Webhook-URL", allowed_hosts=allowed)
    try:
        request = resolve_request(entry, fields)
    except InvalidField as exc:
        raise InvalidRequest(exc.field, exc.message) from None
    book = prices or build_snapshot(catalog, 0, [], [], [])  # in force: gateway/prices/book
    group_name, group = book.group(principal.user_group)
    priced = quote(entry, group_name, group, request, rates=book.rates_at(utcnow()))
    task = build_task(
        tenant_id=principal.tenant_id,
        api_key_id=principal.key_id,
        user_group=group_name,
        entry=entry,
        request=request,
        quote=priced,
        callback_url=callback_url,
        api=api,
        request_id=logs.current_request_id(),
    )
    fingerprint = None
    if idempotency_key is not None:
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidRequest(
                "Idempotency-Key", f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
            )
        # "api" joins the fingerprint only off the unified door, so stored unified ones still match.
        door = {} if api == "unified" else {"api": api}
        fingerprint = request_fingerprint({"model": model_id, **fields, **door}, callback_url)
    outcome = await _reserve(reservations, task, settings, principal, idempotency_key, fingerprint)
    if outcome == "conflict":
        raise Conflict(
            "Idempotency-Key: this key was already used with a different request body; "
            "use a new key for a new request"
        )
    if outcome.startswith("duplicate:"):
        earlier = await read_task(pg, principal.tenant_id, outcome.removeprefix("duplicate:"))
        return Submission(task=earlier, created=False)
    _record_submit(task, fields.get("prompt"), settings)
    return Submission(task=task, created=True)


async def _reserve(
    reservations: Reservations,
    task: NewTask,
    settings: Settings,
    principal: Principal,
    idempotency_key: str | None,
    fingerprint: str | None,
) -> str:
    """Reserve the submit (``reservations.py``); the database's refusals become our errors."""
    cap = limits.max_in_flight(settings, principal)
    budgets = [
        principal.budget_total_micros,
        principal.budget_daily_micros,
        principal.budget_monthly_micros,
    ]
    reservation = Reservation(
        task=task,
        cap=cap,
        periods=limits.spend_periods(task.created_at),
        budgets=budgets,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )
    outcome = await reservations.reserve(reservation)
    if outcome == "TG402":
        raise InsufficientQuota()
    if outcome == "TG429":
        raise limits.too_many_in_flight(cap)
    if outcome.startswith("TGBUD:"):
        index, budget, spent = (int(part) for part in outcome.removeprefix("TGBUD:").split(","))
        raise limits.key_budget_exceeded(index - 1, budget, spent, task.credits_reserved_micros)
    return outcome


async def queue_new_task(enqueues: ScriptBatch, queue_name: str, task: "TaskView") -> None:
    """Queue a just-submitted task's job, in one pipeline with the other submits' that
    arrive together (``gateway/queue.py``, ``enqueue_batch``). The task is committed: if
    Redis fails now, the reconciler queues it from its row
    (``requeue_pending_after_seconds``)."""
    try:
        ticket_ms = int(task.created_at.timestamp() * 1000)
        keys, argv = generation_call(
            queue_name, task.id, task.attempt, fresh=(task.model, ticket_ms)
        )
        await enqueues.run(keys, argv)
    except Exception:
        logger.exception("queueing task %s failed; the reconciler will queue it", task.id)


def _record_submit(task: NewTask, prompt: object, settings: Settings) -> None:
    """Count the new task and log it (it is committed: the request's lines name it)."""
    logs.bind(task_id=task.id)
    metrics.task_submitted(task.model, task.tenant_id, task.credits_reserved_micros)
    extra: dict[str, Any] = {
        "task_id": task.id,
        "model": task.model,
        "credits_reserved_micros": task.credits_reserved_micros,
    }
    if settings.log_prompts:
        extra["prompt"] = prompt
    logger.info("task %s submitted", task.id, extra=extra)


def _contains_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_contains_nul(item) for item in value)
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    return False


_READ = (
    f"SELECT {', '.join(TaskRecord.__dataclass_fields__)} FROM tasks "
    "WHERE id = $1 AND tenant_id = $2"
)


async def read_task(pg: asyncpg.Pool, tenant_id: str, task_id: str) -> TaskRecord:
    """One of the tenant's tasks, or NotFound (another tenant's task too)."""
    row = await pg.fetchrow(_READ, task_id, tenant_id)
    if row is None:
        raise NotFound(f"Task not found: {task_id}")
    return TaskRecord(*row)


class FinishedTasks:
    """Rendered bodies of finished tasks, by task id, the oldest dropped past ``capacity``.

    Safe because a finished task never changes; the tenant is kept with the body, and a
    caller of another tenant gets nothing from here (its read then answers 404).
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._bodies: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    def get(self, tenant_id: str, task_id: str) -> bytes | None:
        found = self._bodies.get(task_id)
        if found is None or found[0] != tenant_id:
            return None
        return found[1]

    def keep(self, task: TaskView, body: bytes) -> None:
        if task.status not in FINAL_STATES:
            return
        self._bodies[task.id] = (task.tenant_id, body)
        if len(self._bodies) > self._capacity:
            self._bodies.popitem(last=False)


async def get_tenant_task(session: AsyncSession, tenant_id: str, task_id: str) -> Task:
    task = await session.get(Task, task_id)
    if task is None or task.tenant_id != tenant_id:
        raise NotFound(f"Task not found: {task_id}")
    return task


async def get_task(session: AsyncSession, task_id: str) -> Task:
    """Any tenant's task, for an operator."""
    return await get_or_404(session, Task, task_id, f"no task {task_id}")


async def list_tasks(
    session: AsyncSession,
    *,
    tenant_id: str | None = None,
    status: str | None = None,
    limit: int = 50,
) -> list[Task]:
    query = select(Task).order_by(col(Task.created_at).desc()).limit(limit)
    if tenant_id is not None:
        query = query.where(Task.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Task.status == status)
    return list((await session.exec(query)).all())


def render_task(task: TaskView, signer: UrlSigner) -> TaskObject:
    status = task.status
    # Pending: always. Processing: while its upstream can cancel the job (the worker
    # records that with the channel it runs on). Final: never.
    can_cancel = status == TaskStatus.PENDING.value or (
        status == TaskStatus.PROCESSING.value and task.can_cancel
    )
    usage = Usage(
        billing_rule=task.billing_rule,
        credits_reserved=credits_from_micros(task.credits_reserved_micros),
        user_group=task.user_group,
        credits_charged=(
            credits_from_micros(task.credits_charged_micros)
            if task.credits_charged_micros is not None
            else None
        ),
    )
    results: list[str] | None = None
    sizes: list[ResultSize] | None = None
    expires_at: int | None = None
    if status == TaskStatus.COMPLETED.value and task.results and task.results_expire_at:
        expires_at = int(task.results_expire_at.timestamp())
        results = [signer.url(key, expires_at) for key in task.results]
        if task.result_sizes:  # none for tasks completed before sizes were recorded
            sizes = [ResultSize(width=w, height=h) for w, h in task.result_sizes]
    error = None
    if status == TaskStatus.FAILED.value or task.error_code:
        error = TaskError(
            code=task.error_code or "generation_failed",
            message=task.error_message or "The generation failed",
        )
    return TaskObject(
        created=int(task.created_at.timestamp()),
        id=task.id,
        model=task.model,
        object="image.generation.task",
        progress=task.progress,
        status=status,
        task_info=TaskInfo(can_cancel=can_cancel, estimated_time=task.estimated_seconds),
        type="image",
        usage=usage,
        results=results,
        result_sizes=sizes,
        expires_at=expires_at,
        error=error,
    )


def task_summary(task: Task) -> dict[str, Any]:
    """An operator's view of a task (admin API and CLI)."""
    return {
        "id": task.id,
        "tenant_id": task.tenant_id,
        "model": task.model,
        "status": task.status,
        "progress": task.progress,
        "attempt": task.attempt,
        "credits_reserved_micros": task.credits_reserved_micros,
        "credits_charged_micros": task.credits_charged_micros,
        "error_code": task.error_code,
        "created_at": task.created_at.isoformat(),
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
    }
