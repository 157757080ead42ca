"""A channel's live health for the operator's page, and its "test" generation.

Health: the circuit breaker's state as the workers keep it in Redis (closed, open,
half-open; failures in the current window), the tasks running on it now, and its error
rate over the last hour (failed / finished tasks that ran there).

The test runs one generation of the channel's cheapest model straight through the
channel's adapter (the same ``workers.providers`` code a worker uses), outside the
queue and the ledger: it tells the operator whether the upstream answers with an image,
and how long it took, without charging any tenant.
"""

import json
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.channels.models import Channel
from gateway.db import utcnow
from gateway.queue import enqueue_channel_test
from gateway.redis_keys import channel_test_key, circuit_key
from gateway.settings import Settings
from gateway.tasks.models import Task, TaskStatus

RECENT = timedelta(hours=1)


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


async def start_test(redis: ArqRedis, queue_name: str, channel_id: str) -> str:
    """Queue a test of the channel on a worker; the id to read its outcome by."""
    test_id = secrets.token_hex(8)
    await enqueue_channel_test(redis, queue_name, channel_id, test_id)
    return test_id


async def test_outcome(redis: Redis, queue_name: str, test_id: str) -> dict[str, Any] | None:
    """The test's outcome, or None while it runs (or if no worker has taken it yet)."""
    raw = await redis.get(channel_test_key(queue_name, test_id))
    if raw is None:
        return None
    found: dict[str, Any] = json.loads(raw)
    return found


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
