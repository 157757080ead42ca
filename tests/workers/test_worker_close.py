"""A worker closes cleanly when a job it cancels had not yet begun (workers/outage.py)."""

import asyncio
import contextlib

import pytest
from conftest import start_worker

from gateway.settings import Settings

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
