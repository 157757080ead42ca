"""Task records: create, read, render.

Services take the session first and never commit; the caller's unit of work
does. A tenant only ever sees its own tasks: another tenant's task id is
answered exactly like an id that does not exist.
"""

import secrets
import string
from datetime import datetime
from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db import utcnow
from gateway.errors import NotFound
from gateway.storage import UrlSigner
from gateway.tasks.models import Task, TaskStatus
from gateway.tasks.schemas import TaskError, TaskInfo, TaskObject, Usage
from pricing.catalog import ModelEntry
from pricing.money import credits_from_micros
from pricing.quote import Quote
from pricing.request import ImageRequest

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
        created_at=now,
    )


async def get_tenant_task(session: AsyncSession, tenant_id: str, task_id: str) -> Task:
    task = await session.get(Task, task_id)
    if task is None or task.tenant_id != tenant_id:
        raise NotFound(f"Task not found: {task_id}")
    return task


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
    # Cancelling arrives with the cancel route (issue 6); until then no task claims it.
    can_cancel = False
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
