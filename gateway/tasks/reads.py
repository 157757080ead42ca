"""Reads of tasks by id that arrive together, answered by one query.

``GET /v1/tasks/{id}`` is the API's most frequent request (clients poll). Alone,
each read is a round trip of its own on the hot asyncpg pool. ``TaskReads`` sends
the reads that are waiting as one ``WHERE id = ANY(…)`` query and, while that is
out, gathers the next ones. A lone read is sent at once; under load the batches
grow by themselves.

Rules:

- A read is answered by a query sent after it was asked: it sees every change
  committed before it was asked, as an unbatched read would.
- The tenant is checked per read: another tenant's task is NotFound, as it is
  for ``service.read_task``.
- A query that fails fails every read of its batch with that error.
- A caller that stops waiting is skipped when the answer comes.
"""

import asyncio
import contextlib
from typing import Any

from gateway.errors import NotFound
from gateway.tasks.service import TaskRecord

_READ_MANY = (
    f"SELECT {', '.join(TaskRecord.__dataclass_fields__)} FROM tasks WHERE id = ANY($1::text[])"
)


class TaskReads:
    def __init__(self, pg: Any) -> None:
        self._pg = pg  # asyncpg.Pool (untyped): the hot paths' pool
        self._waiting: list[tuple[str, asyncio.Future[TaskRecord | None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.queries = 0  # batches sent (tests, profiling)

    async def read(self, tenant_id: str, task_id: str) -> TaskRecord:
        """One of the tenant's tasks, or NotFound (another tenant's task too)."""
        answer: asyncio.Future[TaskRecord | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((task_id, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_waiting(), name="task-reads")
        found = await answer
        if found is None or found.tenant_id != tenant_id:
            raise NotFound(f"Task not found: {task_id}")
        return found

    async def read_many(self, task_ids: list[str]) -> list[TaskRecord]:
        """The tasks of these ids that exist, whatever their tenant, in one query."""
        self.queries += 1
        return [TaskRecord(*row) for row in await self._pg.fetch(_READ_MANY, task_ids)]

    async def _send_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                rows = await self.read_many(list({task_id for task_id, _ in batch}))
            except Exception as exc:  # every read of the batch fails with it
                for _, answer in batch:
                    if not answer.done():
                        answer.set_exception(exc)
                continue
            found = {row.id: row for row in rows}
            for task_id, answer in batch:
                if not answer.done():
                    answer.set_result(found.get(task_id))

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
