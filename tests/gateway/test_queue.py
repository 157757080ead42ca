"""The submit path's enqueues (``gateway/queue.py``, ``enqueue_batch``): jobs queued together
share a pipeline, each still queued exactly once, in arq's own format."""

import asyncio
import secrets
from collections import Counter

from arq.constants import job_key_prefix
from arq.jobs import deserialize_job
from redis.asyncio import Redis

from gateway.queue import enqueue_batch, generation_call
from gateway.redis_keys import GENERATE_JOB, generate_job_id
from gateway.settings import Settings


async def test_submits_queued_together_share_pipelines_and_each_job_is_queued_once(
    settings: Settings, redis: Redis
) -> None:
    """40 enqueues at once, two of each of 20 tasks' jobs (a retried submit's): 20 queue
    their job and 20 find it queued; fewer than 40 round trips; each job is arq's, with
    the task, its attempt and the fields its first run reads before PostgreSQL."""
    quick = Redis.from_url(settings.redis_url)
    batch = enqueue_batch(quick, timeout_seconds=5)
    tasks = [f"task_{secrets.token_hex(8)}" for _ in range(20)]
    try:
        calls = [
            generation_call(settings.queue_name, task, 1, fresh=("flux-1-schnell", 1_000 + i))
            for i, task in enumerate(tasks)
        ]
        answers = await asyncio.gather(*(batch.run(*call) for call in calls + calls))
        assert Counter(answers) == {1: 20, 0: 20}
        assert batch.batches < 40

        queued = {m.decode() for m in await redis.zrange(settings.queue_name, 0, -1)}
        assert queued == {generate_job_id(task, 1) for task in tasks}
        for i, task in enumerate(tasks):
            payload = await redis.get(job_key_prefix + generate_job_id(task, 1))
            assert payload is not None
            job = deserialize_job(payload)
            assert job.function == GENERATE_JOB
            assert job.args == (task, 1)
            assert job.kwargs == {"model": "flux-1-schnell", "ticket_ms": 1_000 + i}
    finally:
        await redis.delete(*(job_key_prefix + generate_job_id(task, 1) for task in tasks))
        await quick.aclose()


async def test_a_batch_sent_to_a_redis_without_the_script_loads_it_and_queues_every_job(
    settings: Settings, redis: Redis
) -> None:
    """A restarted Redis has no scripts: the batch's runs are refused with NOSCRIPT, did
    nothing, and are sent again once the script is loaded; each job is queued once."""
    quick = Redis.from_url(settings.redis_url)
    batch = enqueue_batch(quick, timeout_seconds=5)
    tasks = [f"task_{secrets.token_hex(8)}" for _ in range(5)]
    try:
        await redis.script_flush()
        calls = [generation_call(settings.queue_name, task, 2) for task in tasks]
        assert await asyncio.gather(*(batch.run(*call) for call in calls)) == [1] * 5
        assert await redis.zcard(settings.queue_name) == 5
    finally:
        await redis.delete(*(job_key_prefix + generate_job_id(task, 2) for task in tasks))
        await quick.aclose()
