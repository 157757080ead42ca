"""A channel's live health for the operator's page, and its "test" generation.

Health: the circuit breaker's state as the workers keep it in Redis (closed, open,
half-open; failures in the current window), the tasks running on it now, and its error
rate over the last hour (failed / finished tasks that ran there).

The test runs one generation of the channel's cheapest model straight through the
channel's adapter (the same ``workers.providers`` code a worker uses), outside the
queue and the ledger: it tells the operator whether the upstream answers with an image,
and how long it took, without charging any tenant.
"""

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.channels.models import Channel
from gateway.db import utcnow
from gateway.redis_keys import circuit_key
from gateway.settings import Settings
from gateway.tasks.models import Task, TaskStatus
from pricing.catalog import Catalog, ModelEntry
from pricing.request import resolve_request
from workers.providers import ADAPTERS
from workers.providers.base import Endpoint, UpstreamError

RECENT = timedelta(hours=1)
TEST_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Health:
    circuit: str  # "closed", "open", "half-open"
    retry_in: float
    failures: int
    in_flight: int
    finished: int
    failed: int

    @property
    def error_rate(self) -> str:
        return "—" if not self.finished else f"{100 * self.failed / self.finished:.0f}%"


async def health(
    session: AsyncSession, redis: Redis, settings: Settings, channels: list[Channel]
) -> dict[str, Health]:
    ids = [c.id for c in channels]
    if not ids:
        return {}
    since = utcnow() - RECENT
    running = sa.func.count().filter(col(Task.status) == TaskStatus.PROCESSING.value)
    ended = sa.func.count().filter(col(Task.finished_at) >= since)
    failed = sa.func.count().filter(
        col(Task.finished_at) >= since, col(Task.status) == TaskStatus.FAILED.value
    )
    query = (
        select(col(Task.channel_id), running, ended, failed)
        .where(col(Task.channel_id).in_(ids))
        .where((col(Task.status) == TaskStatus.PROCESSING.value) | (col(Task.finished_at) >= since))
        .group_by(col(Task.channel_id))
    )
    counts = {row[0]: row[1:] for row in (await session.exec(query)).all()}
    namespace = settings.queue_name
    async with redis.pipeline(transaction=False) as pipe:
        for channel_id in ids:
            pipe.pttl(circuit_key(namespace, channel_id, "open"))
            pipe.exists(circuit_key(namespace, channel_id, "tripped"))
            pipe.get(circuit_key(namespace, channel_id, "failures"))
        answers = await pipe.execute()
    found: dict[str, Health] = {}
    for n, channel_id in enumerate(ids):
        open_ms, tripped, failures = answers[3 * n : 3 * n + 3]
        if open_ms is not None and int(open_ms) > 0:
            state = "open"
        elif tripped:
            state = "half-open"
        else:
            state = "closed"
        flying, finished, failed_count = counts.get(channel_id, (0, 0, 0))
        found[channel_id] = Health(
            circuit=state,
            retry_in=max(int(open_ms or 0), 0) / 1000,
            failures=int(failures or 0),
            in_flight=int(flying),
            finished=int(finished),
            failed=int(failed_count),
        )
    return found


def cheapest(channel: Channel, catalog: Catalog) -> ModelEntry:
    entries = [e for m in channel.models if (e := catalog.model(m)) is not None]
    if not entries:
        raise ValueError("the channel serves no model of the catalogue")
    return min(entries, key=lambda e: (e.price.amount, e.images_per_generation))


@dataclass(frozen=True, slots=True)
class TestResult:
    ok: bool
    model: str
    seconds: float
    detail: str


async def run_test(channel: Channel, catalog: Catalog, settings: Settings) -> TestResult:
    started = time.monotonic()
    try:
        entry = cheapest(channel, catalog)
    except ValueError as exc:
        return TestResult(False, "—", 0.0, str(exc))
    request = resolve_request(entry, {"prompt": "a small red circle on white, test image"})
    build = ADAPTERS.get(channel.adapter)
    if build is None:
        return TestResult(False, entry.id, 0.0, f"unknown adapter {channel.adapter!r}")
    endpoint = Endpoint(
        base_url=channel.base_url.rstrip("/"),
        api_key=channel.api_key,
        submit_timeout=settings.upstream_timeout_seconds,
        poll_timeout=settings.upstream_poll_timeout_seconds,
        max_body_bytes=settings.upstream_max_body_bytes,
        max_image_bytes=settings.max_image_bytes,
    )
    upstream_model = channel.models.get(entry.id) or entry.upstream_model
    try:
        async with httpx.AsyncClient(timeout=settings.upstream_timeout_seconds) as client:
            adapter = build(client, endpoint)
            async with asyncio.timeout(TEST_TIMEOUT_SECONDS):
                submitted = await adapter.submit(upstream_model, request)
                state = submitted.state
                while state is None or state.status in ("pending", "processing"):
                    if state is not None:
                        await asyncio.sleep(max(settings.poll_interval_seconds, 0.2))
                    assert submitted.job_id is not None
                    state = await adapter.poll(submitted.job_id)
    except TimeoutError:
        return _result(False, entry, started, f"no result within {TEST_TIMEOUT_SECONDS:.0f} s")
    except UpstreamError as exc:
        return _result(False, entry, started, f"{exc.code}: {exc.message}")
    except httpx.HTTPError as exc:
        return _result(False, entry, started, f"could not reach the upstream: {type(exc).__name__}")
    if state.status != "completed":
        return _result(False, entry, started, f"the job ended {state.status}: {state.error or ''}")
    images = len(state.urls) + len(state.images)
    return _result(images > 0, entry, started, f"completed with {images} image(s)")


def _result(ok: bool, entry: ModelEntry, started: float, detail: str) -> TestResult:
    return TestResult(ok, entry.id, round(time.monotonic() - started, 2), detail)


def models_from_text(text: str) -> dict[str, Any]:
    """``model`` or ``model=upstream-id``, one per line or comma-separated."""
    models: dict[str, Any] = {}
    for item in text.replace(",", "\n").splitlines():
        item = item.strip()
        if item:
            name, _, upstream = item.partition("=")
            models[name.strip()] = upstream.strip() or None
    return models


def models_to_text(models: dict[str, str | None]) -> str:
    return "\n".join(f"{m}={u}" if u else m for m, u in models.items())
