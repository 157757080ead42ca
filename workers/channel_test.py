"""An operator's channel test: one generation of the channel's cheapest model, straight
through its adapter, outside the queue of tasks and the ledger (no tenant pays for it).

The console's "Test" button queues ``test_channel`` (``gateway.queue.enqueue_channel_test``);
a worker runs it here with its own HTTP client and writes the outcome to Redis
(``channel_test_key``) for ten minutes, where the console's page reads it. The channel is
read from the database whether enabled or not, so a channel can be tried before it takes
traffic. Nothing is downloaded: the upstream's answer (a completed job with images) is the
test.
"""

import asyncio
import json
import logging
import time
from typing import Any

from sqlalchemy import select

from gateway.channels.models import Channel
from gateway.redis_keys import channel_test_key
from pricing.catalog import Catalog, ModelEntry
from pricing.request import resolve_request
from workers.deps import WorkerDeps
from workers.providers import ADAPTERS
from workers.providers.base import JobState, UpstreamError
from workers.routing import channel_endpoint

logger = logging.getLogger("tollgate.channel_test")

RESULT_SECONDS = 600
TEST_TIMEOUT_SECONDS = 60.0
TEST_PROMPT = "a small red circle on a white background"


def cheapest(models: dict[str, str | None], catalog: Catalog) -> ModelEntry | None:
    entries = [e for m in models if (e := catalog.model(m)) is not None]
    if not entries:
        return None
    return min(entries, key=lambda e: (e.price.amount, e.images_per_generation))


async def run_test(deps: WorkerDeps, channel_id: str) -> dict[str, Any]:
    """The outcome: ``ok``, the model tried, seconds taken and what happened."""
    started = time.monotonic()
    table = Channel.__table__  # type: ignore[attr-defined]
    async with deps.engine.connect() as conn:
        row = (await conn.execute(select(table).where(table.c.id == channel_id))).first()
    if row is None:
        return {"ok": False, "model": None, "seconds": 0.0, "detail": "the channel is gone"}
    entry = cheapest(dict(row.models), deps.catalog)
    build = ADAPTERS.get(row.adapter)
    if entry is None or build is None:
        return {"ok": False, "model": None, "seconds": 0.0, "detail": "no model or adapter"}

    def outcome(ok: bool, detail: str) -> dict[str, Any]:
        seconds = round(time.monotonic() - started, 2)
        return {"ok": ok, "model": entry.id, "seconds": seconds, "detail": detail}

    provider = build(deps.http, channel_endpoint(deps.settings, row.base_url, row.api_key))
    upstream_model = row.models.get(entry.id) or entry.upstream_model
    request = resolve_request(entry, {"prompt": TEST_PROMPT})
    try:
        async with asyncio.timeout(TEST_TIMEOUT_SECONDS):
            submitted = await provider.submit(upstream_model, request)
            state: JobState | None = submitted.state
            while state is None or state.status in ("pending", "processing"):
                if state is not None:
                    await asyncio.sleep(deps.settings.poll_interval_seconds)
                if submitted.job_id is None:
                    return outcome(False, "the upstream gave neither a job nor a result")
                state = await provider.poll(submitted.job_id)
    except TimeoutError:
        return outcome(False, f"no result within {TEST_TIMEOUT_SECONDS:.0f} s")
    except UpstreamError as exc:
        return outcome(False, f"{exc.code}: {exc.message}")
    if state.status != "completed":
        return outcome(False, f"the job ended {state.status}: {state.error or 'no reason given'}")
    images = len(state.urls) + len(state.images)
    if not images:
        return outcome(False, "the job completed without images")
    return outcome(True, f"completed with {images} image(s)")


async def test_channel(ctx: dict[str, Any], channel_id: str, test_id: str) -> None:
    deps: WorkerDeps = ctx["deps"]
    try:
        result = await run_test(deps, channel_id)
    except Exception as exc:  # the operator sees it, whatever it was
        logger.exception("channel test of %s failed", channel_id)
        result = {"ok": False, "model": None, "seconds": 0.0, "detail": type(exc).__name__}
    key = channel_test_key(deps.settings.queue_name, test_id)
    await ctx["redis"].set(key, json.dumps(result), ex=RESULT_SECONDS)
