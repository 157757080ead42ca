"""The generation job's storing step: put one result, waiting out a store that is away.

An unreachable or refusing store (``StorageUnavailable``) never completes a task
without its images: the put is tried again after 1, 2, 4 … 30 s while the job
keeps its lease (``pause``), and when the task's deadline leaves no time for
another try the task fails with ``storage_unavailable`` (its hold released).
Keys are fixed per task and index, so a try that did reach the store and is
repeated only writes the same bytes again.
"""

import logging
from collections.abc import Awaitable, Callable

from gateway import metrics
from gateway.storage import Storage, StorageUnavailable

logger = logging.getLogger("tollgate.generate")

FIRST_WAIT_SECONDS = 1.0
MAX_WAIT_SECONDS = 30.0


class ResultsNotStored(Exception):
    """The store stayed unavailable until the task's deadline."""


async def put_result(
    storage: Storage,
    key: str,
    data: bytes,
    *,
    remaining: Callable[[], float],
    pause: Callable[[float], Awaitable[None]],
) -> None:
    """``remaining``: seconds left before the task's deadline; ``pause``: a sleep that
    keeps the lease alive."""
    wait = FIRST_WAIT_SECONDS
    while True:
        try:
            await storage.put(key, data)
            return
        except StorageUnavailable as exc:
            metrics.storage_failed(storage.backend, "put")
            if remaining() <= wait:
                raise ResultsNotStored(str(exc)) from exc
            logger.warning("storing %s failed (%s); trying again in %.0f s", key, exc, wait)
            await pause(wait)
            wait = min(wait * 2, MAX_WAIT_SECONDS)
