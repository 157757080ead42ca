"""Cancelling a task at its tenant's request (both doors: ``POST /v1/tasks/{id}/cancel``,
``DELETE /jobs/{id}``).

The task becomes cancelled and its hold is released in one transaction
(``lifecycle.cancel``: ``tollgate_cancel``, through the same settlement as every
other end, ``tollgate_settle``, so the in-flight slot, key budgets and the
callback are handled alike). After the
commit the route layer queues the callback's first attempt and, when an upstream
job runs, asks a worker to cancel it there (``gateway/tasks/routes.py``,
``cancel_and_queue``); a worker still polling that job finds its attempt fenced
out and stops without writing.
"""

from dataclasses import dataclass

from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.errors import Conflict
from gateway.tasks import lifecycle
from gateway.tasks.models import Task, TaskStatus
from gateway.tasks.service import get_tenant_task


@dataclass(frozen=True, slots=True)
class Cancellation:
    task: Task  # as it is now: cancelled
    ended: lifecycle.Cancelled  # its callback and the upstream job to cancel, if any


async def cancel_task(session: AsyncSession, tenant_id: str, task_id: str) -> Cancellation:
    """Cancel the task (or say why not: 404 not the tenant's, 409 not cancellable now)."""
    conn = await session.connection()
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
    return Cancellation(task, cancelled)
