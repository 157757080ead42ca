"""Cancelling a task at its tenant's request (``POST /v1/tasks/{id}/cancel``).

The task becomes cancelled and its hold is released in one transaction
(``lifecycle.cancel``, through the same ``_finish`` as every other end, so the
in-flight slot, key budgets and the callback are handled alike). After the
commit the callback's first attempt is queued, and, when an upstream job
runs, a worker is asked to cancel it there; a worker still polling that job
finds its attempt fenced out and stops without writing.
"""

from functools import partial

from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.callbacks import service as callbacks
from gateway.deps import Services, UnitOfWork
from gateway.errors import Conflict
from gateway.queue import enqueue_callback, enqueue_upstream_cancel
from gateway.tasks import lifecycle
from gateway.tasks.models import Task, TaskStatus
from gateway.tasks.service import get_tenant_task


async def cancel_task(uow: UnitOfWork, services: Services, tenant_id: str, task_id: str) -> Task:
    """Cancel the task (or say why not: 404 not the tenant's, 409 not cancellable now)."""
    session = uow.session
    conn: AsyncConnection = await session.connection()
    cancelled = await lifecycle.cancel(conn, task_id, tenant_id)
    task = await get_tenant_task(session, tenant_id, task_id)
    await session.refresh(task)
    if cancelled is None:
        if task.status == TaskStatus.PROCESSING.value:
            raise Conflict(
                f"Task {task_id} cannot be cancelled: its generation is running at an "
                "upstream that cannot stop it"
            )
        raise Conflict(f"Task {task_id} cannot be cancelled: it is {task.status}")
    settings = services.settings
    for delivery_id in await callbacks.pending_for_task(conn, task_id):
        uow.after_commit.append(
            partial(enqueue_callback, services.redis, settings.callback_queue_name, delivery_id, 1)
        )
    if cancelled.channel_id and cancelled.upstream_job_id:
        uow.after_commit.append(
            partial(
                enqueue_upstream_cancel,
                services.redis,
                settings.queue_name,
                task_id,
                cancelled.channel_id,
                cancelled.upstream_job_id,
            )
        )
    return task
