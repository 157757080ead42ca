"""Waiting for a task: long-poll (``Prefer: wait=N``) and server-sent events.

Rules:

- A waiter registers its ``Watch`` (``gateway/tasks/events.py``) *before* it
  reads the task, reads it once, and then waits on the signal alone: it holds
  no database connection and makes no query while it waits.
- **Long-poll** answers as soon as the task is final, or when its ``N`` seconds
  are up; then it reads the task once more, so an end whose signal was lost is
  still answered (late, never wrong).
- **Events** are snapshots of the task. An event's id is its state,
  ``<status>.<progress>`` (``processing.40``); a stream sends a snapshot only
  when the state has moved on from the last one it sent (or, on a resumed
  stream, from ``Last-Event-ID``), so no event is sent twice, and it ends after
  the final state. A resumed stream skips the progress steps it missed and
  sends the state as it is now. A comment line every ``KEEPALIVE_SECONDS`` keeps
  idle connections open through proxies; every ``RECHECK_SECONDS`` without a
  signal the stream re-reads its task, in case a signal was lost.
"""

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from gateway.deps import Services
from gateway.errors import InvalidRequest
from gateway.tasks.models import FINAL_STATES, TaskStatus
from gateway.tasks.schemas import encode_json
from gateway.tasks.service import TaskRecord, TaskView

MAX_WAIT_SECONDS = 60
KEEPALIVE_SECONDS = 15.0
RECHECK_SECONDS = 60.0

_WAIT = re.compile(r"^\d{1,6}$")
_RANK = {
    TaskStatus.PENDING.value: 0,
    TaskStatus.PROCESSING.value: 1,
    TaskStatus.COMPLETED.value: 2,
    TaskStatus.FAILED.value: 2,
    TaskStatus.CANCELLED.value: 2,
}


def is_final(task: TaskView) -> bool:
    return task.status in FINAL_STATES


def requested_wait(prefer: str | None) -> int | None:
    """The ``wait`` preference of a ``Prefer`` header (RFC 7240), capped at 60 seconds;
    None when the header asks for no wait. Other preferences are ignored."""
    if not prefer:
        return None
    for preference in prefer.split(","):
        name, _, value = preference.split(";", 1)[0].strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not _WAIT.match(value):
            raise InvalidRequest(
                "Prefer", f"wait must be a whole number of seconds from 0 to {MAX_WAIT_SECONDS}"
            )
        return min(int(value), MAX_WAIT_SECONDS)
    return None


async def read_task(services: Services, tenant_id: str, task_id: str) -> TaskRecord:
    """The tenant's task (404 otherwise), read on the hot pool as the plain
    ``GET /v1/tasks/{id}`` reads it (``gateway/tasks/reads.py``), its connection
    given back at once."""
    return await services.task_reads.read(tenant_id, task_id)


async def wait_for_task(
    services: Services, tenant_id: str, task_id: str, seconds: float
) -> TaskRecord:
    """The task once it is final, or as it is after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    with services.task_events.watch(task_id) as watch:
        task = await read_task(services, tenant_id, task_id)
        while not is_final(task):
            fresh = await watch.changed(deadline - loop.time())
            if fresh is None:
                # The deadline: whatever signal may have been lost, answer the row.
                return await read_task(services, tenant_id, task_id)
            task = fresh
    return task


# --- Server-sent events ------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class State:
    """Where a task stands, as events see it; ordered as a task moves."""

    rank: int
    progress: int
    status: str

    @classmethod
    def of(cls, task: TaskView) -> "State":
        return cls(_RANK[task.status], task.progress, task.status)

    @property
    def event_id(self) -> str:
        return f"{self.status}.{self.progress}"

    def before(self, other: "State") -> bool:
        return (self.rank, self.progress) < (other.rank, other.progress)


def parse_event_id(value: str | None) -> State | None:
    """The state a ``Last-Event-ID`` names; 400 naming the header when it names none."""
    if value is None or not value.strip():
        return None
    status, _, progress = value.strip().partition(".")
    if status not in _RANK or not progress.isdigit() or int(progress) > 100:
        raise InvalidRequest(
            "Last-Event-ID", "must be an event id this stream sent, such as processing.40"
        )
    return State(_RANK[status], int(progress), status)


def sse_event(task: TaskView, render: Callable[[TaskView], object]) -> bytes:
    state = State.of(task)
    data = encode_json(render(task)).decode()
    return f"id: {state.event_id}\nevent: task\ndata: {data}\n\n".encode()


async def task_events(
    services: Services,
    tenant_id: str,
    task_id: str,
    last: State | None,
    render: Callable[[TaskView], object],
) -> AsyncIterator[bytes]:
    """The event stream of one task, from the state after ``last`` to its end."""
    loop = asyncio.get_running_loop()
    with services.task_events.watch(task_id) as watch:
        task = await read_task(services, tenant_id, task_id)
        yield b"retry: 1000\n\n"
        recheck = loop.time() + RECHECK_SECONDS
        while True:
            state = State.of(task)
            if last is None or last.before(state):
                yield sse_event(task, render)
                last = state
            if is_final(task):
                return
            fresh = await watch.changed(min(KEEPALIVE_SECONDS, recheck - loop.time()))
            if fresh is not None:
                task = fresh
            elif loop.time() >= recheck:
                # No signal for a long while: re-read, in case one was lost.
                task = await read_task(services, tenant_id, task_id)
            else:
                yield b": keep-alive\n\n"
                continue
            recheck = loop.time() + RECHECK_SECONDS
