"""Task records: create, read, render.

Services take the session first and never commit; the caller's unit of work
does. A tenant only ever sees its own tasks: another tenant's task id is
answered exactly like an id that does not exist.
"""

import hashlib
import json
import logging
import secrets
import string
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import Table
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway import logs, metrics
from gateway.auth import Principal
from gateway.callback_urls import validate_callback_url
from gateway.db import get_or_404, utcnow
from gateway.errors import Conflict, InvalidRequest, ModelAccessDenied, NotFound
from gateway.ledger import service as ledger
from gateway.limits import service as limits
from gateway.settings import Settings
from gateway.storage import UrlSigner
from gateway.tasks.models import IdempotencyKey, Task, TaskStatus
from gateway.tasks.schemas import TaskError, TaskInfo, TaskObject, Usage
from pricing.catalog import Catalog, ModelEntry
from pricing.money import credits_from_micros
from pricing.quote import Quote, quote
from pricing.request import ImageRequest, InvalidField, resolve_request

logger = logging.getLogger("tollgate.tasks")

idempotency_keys: Table = IdempotencyKey.__table__  # type: ignore[attr-defined]
MAX_IDEMPOTENCY_KEY = 255

_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_task_id(now: datetime) -> str:
    """``task-unified-<unix seconds>-<12 random chars>``, the contract's id shape."""
    suffix = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    return f"task-unified-{int(now.timestamp())}-{suffix}"


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
) -> Task:
    now = utcnow()
    return Task(
        id=new_task_id(now),
        tenant_id=tenant_id,
        api_key_id=api_key_id,
        model=entry.id,
        provider=entry.provider,
        status=TaskStatus.PENDING.value,
        progress=0,
        request=request.to_json(),
        quote=quote.to_json(),
        billing_rule=quote.billing_rule,
        user_group=user_group,
        credits_reserved_micros=quote.amount_micros,
        estimated_seconds=entry.estimated_seconds,
        can_cancel=entry.can_cancel,
        callback_url=callback_url,
        api=api,
        request_id=request_id,
        created_at=now,
    )


@dataclass(frozen=True, slots=True)
class Submission:
    task: Task
    created: bool  # False: an Idempotency-Key retry answered with the task made before


def request_fingerprint(fields: dict[str, Any], callback_url: str | None) -> str:
    canonical = json.dumps({**fields, "callback_url": callback_url}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def submit_generation(
    session: AsyncSession,
    *,
    catalog: Catalog,
    settings: Settings,
    principal: Principal,
    fields: dict[str, Any],
    webhook_url: str | None,
    idempotency_key: str | None,
    api: str = "unified",
) -> Submission:
    """Validate, price, claim the idempotency key, record the task and hold its credits.

    Also enforces the tenant's cap on tasks in flight, the models the key may
    use and the key's budgets (``gateway/limits/service.py``).

    All in the caller's one transaction: if the hold fails (402) nothing of it
    remains. A retry with the same Idempotency-Key finds the first task; a
    concurrent one waits on the key's row until the first commits.

    ``api`` is the front door the request came through ("unified", or "krea" from
    ``gateway/krea/``); it is recorded on the task and decides the shape of its
    callback. One key sent to both doors is a different request (409).
    """
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
    groups = catalog.groups
    group_name = principal.user_group if principal.user_group in groups else "default"
    priced = quote(entry, group_name, groups[group_name], request)
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
    if idempotency_key is not None:
        # "api" joins the fingerprint only off the unified door, so stored unified ones still match.
        door = {} if api == "unified" else {"api": api}
        earlier = await _claim_idempotency_key(
            session,
            principal.tenant_id,
            idempotency_key,
            request_fingerprint({"model": model_id, **fields, **door}, callback_url),
            task.id,
        )
        if earlier is not None:
            return Submission(task=earlier, created=False)
    await limits.take_in_flight_slot(session, settings, principal)
    session.add(task)
    await session.flush()
    await ledger.hold(session, principal.tenant_id, task.id, priced.amount_micros)
    await limits.count_spend(session, principal, priced.amount_micros, task.created_at)
    _record_submit(await session.connection(), task, fields.get("prompt"), settings)
    return Submission(task=task, created=True)


def _record_submit(conn: AsyncConnection, task: Task, prompt: object, settings: Settings) -> None:
    """Count the new task and log it once the submit commits (the request's lines name it)."""
    logs.bind(task_id=task.id)
    metrics.task_submitted(conn, task.model)
    extra: dict[str, Any] = {
        "task_id": task.id,
        "model": task.model,
        "credits_reserved_micros": task.credits_reserved_micros,
    }
    if settings.log_prompts:
        extra["prompt"] = prompt
    metrics.after_commit(conn, partial(logger.info, "task %s submitted", task.id, extra=extra))


def _contains_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_contains_nul(item) for item in value)
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    return False


async def _claim_idempotency_key(
    session: AsyncSession, tenant_id: str, key: str, fingerprint: str, task_id: str
) -> Task | None:
    """Claim ``key`` for ``task_id``; or return the task an identical earlier request made."""
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest("Idempotency-Key", f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    conn = await session.connection()
    claimed = await conn.execute(
        pg_insert(idempotency_keys)
        .values(
            tenant_id=tenant_id,
            key=key,
            request_hash=fingerprint,
            task_id=task_id,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing()
        .returning(idempotency_keys.c.key)
    )
    if claimed.first() is not None:
        return None
    row = (
        await conn.execute(
            core_select(idempotency_keys.c.request_hash, idempotency_keys.c.task_id).where(
                idempotency_keys.c.tenant_id == tenant_id, idempotency_keys.c.key == key
            )
        )
    ).one()
    if row[0] != fingerprint:
        raise Conflict(
            "Idempotency-Key: this key was already used with a different request body; "
            "use a new key for a new request"
        )
    task = await session.get(Task, row[1])
    assert task is not None  # the key's task is committed with it
    return task


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


def render_task(task: Task, signer: UrlSigner) -> TaskObject:
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
    expires_at: int | None = None
    if status == TaskStatus.COMPLETED.value and task.results and task.results_expire_at:
        expires_at = int(task.results_expire_at.timestamp())
        results = [signer.url(key, expires_at) for key in task.results]
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
