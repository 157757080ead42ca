"""A worker closes cleanly: when a job it cancels had not yet begun, when it is stopped as it
wakes, as it connects or as it starts (workers/resilient.py)."""

import asyncio
import contextlib
import gc

import pytest
from conftest import start_worker

from gateway.settings import Settings
from workers.outage import wait_set

pytestmark = pytest.mark.asyncio


async def test_close_survives_a_job_cancelled_before_its_handler_began(
    settings: Settings,
) -> None:
    arq_worker, running = start_worker(settings)
    try:
        for _ in range(200):
            if arq_worker._pool is not None:
                break
            await asyncio.sleep(0.05)
        assert arq_worker._pool is not None, "the worker never connected"
        # A job task cancelled before arq's own handler catches anything (a cron tick that
        # has just started): its CancelledError comes out of arq's gather in close().
        arq_worker.tasks["just-started"] = asyncio.create_task(asyncio.sleep(30))
        await arq_worker.close()
        assert arq_worker._pool is None
        assert arq_worker.tasks["just-started"].cancelled()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_a_stop_that_comes_as_the_worker_wakes_still_stops_it() -> None:
    """The poll loop's waits: a cancellation (arq's stop) that arrives as the awaited event
    is set must not be lost, or a worker told to stop polls on (asyncio.wait_for on 3.11)."""
    event = asyncio.Event()
    waiting = asyncio.create_task(wait_set(event, 30))
    await asyncio.sleep(0)  # waiting on the event
    event.set()
    waiting.cancel()
    await asyncio.wait([waiting], timeout=5)
    assert waiting.cancelled()


async def test_a_worker_closed_while_it_connects_leaves_no_connection_open(
    settings: Settings,
) -> None:
    """Stopped as it starts (its pool still being opened): the pool is closed all the same
    (a leak shows as an unclosed-connection ResourceWarning, an error in this suite)."""
    for step in range(40):  # one of these stops lands as the pool's first command runs
        delay = step * 0.0005
        arq_worker, running = start_worker(settings)
        await asyncio.sleep(delay)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await arq_worker.close()
    gc.collect()


async def test_a_worker_closed_as_it_starts_ends_its_start_up_before_its_pool_closes(
    settings: Settings,
) -> None:
    """Closed while its start-up runs (the pool open, the rest being opened), the way the
    tests close a worker: the start-up is stopped and closes what it opened before the pool
    closes. Closed under it, the start-up took connections the pool opened anew and nobody
    closed (a ResourceWarning another test's ``gc.collect`` found, one run in three)."""
    for _ in range(10):
        arq_worker, running = start_worker(settings)
        for _ in range(400):
            if arq_worker._pool is not None:
                break
            await asyncio.sleep(0.005)
        await arq_worker.close()
        assert arq_worker.main_task is not None
        assert arq_worker.main_task.done()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    gc.collect()
