"""Enqueueing work for the workers: the gateway's only way to reach them.

Every job is queued by one Lua script, one round trip: it does what arq's
``enqueue_job`` does in three (WATCH, EXISTS, MULTI/EXEC), atomically — nothing
when the job or its result already exists, else the job's payload (arq's own
serialisation, so any arq worker runs it) and its place in the queue — and
wakes the queue's workers, which look for it at once, not at their next poll.
"""

import logging
import time

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from gateway.redis_keys import (
    CALLBACK_JOB,
    CANCEL_JOB,
    CHANNEL_TEST_JOB,
    GENERATE_JOB,
    arq_in_progress_key,
    callback_job_id,
    cancel_job_id,
    generate_job_id,
    queue_wake_channel,
)
from gateway.script_batch import ScriptBatch

logger = logging.getLogger("tollgate.queue")


# The enqueue as a Lua function, for this module's script and for others that queue a job
# among other writes in their one round trip (workers/run_end.py).
ENQUEUE_FUNCTION = """
local function enqueue(job_key, result_key, queue, expiry_ms, payload, score, job_id, wake)
  if redis.call('EXISTS', job_key, result_key) > 0 then return 0 end
  redis.call('PSETEX', job_key, expiry_ms, payload)
  redis.call('ZADD', queue, score, job_id)
  redis.call('PUBLISH', wake, '1')
  return 1
end
"""
# KEYS: the job's key, its result's key, the queue. ARGV: expiry ms, payload, score, job id,
# the queue's wake channel (its workers look for the job at once, not at their next poll).
_ENQUEUE = ENQUEUE_FUNCTION + (
    "return enqueue(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])\n"
)
_EXPIRES_EXTRA_MS = 86_400_000  # arq's default: a job not started within a day is dropped


def job_call(
    queue_name: str,
    function: str,
    args: tuple[object, ...],
    job_id: str,
    *,
    kwargs: dict[str, object] | None = None,
    delay: float = 0,
) -> tuple[list[str], list[bytes | str | int]]:
    """The KEYS and ARGV of ``enqueue`` for one arq job, ``delay`` seconds from now."""
    now_ms = round(time.time() * 1000)
    delay_ms = round(delay * 1000)
    payload = serialize_job(function, args, kwargs or {}, None, now_ms)
    keys = [job_key_prefix + job_id, result_key_prefix + job_id, queue_name]
    argv: list[bytes | str | int] = [
        delay_ms + _EXPIRES_EXTRA_MS,
        payload,
        now_ms + delay_ms,
        job_id,
        queue_wake_channel(queue_name),
    ]
    return keys, argv


async def _enqueue(redis: Redis, keys: list[str], argv: list[bytes | str | int]) -> bool:
    """Queue one arq job (``job_call``'s KEYS and ARGV); False if it is queued or running."""
    script = redis.register_script(_ENQUEUE)
    return bool(await script(keys=keys, args=argv))


def enqueue_batch(redis: Redis, timeout_seconds: float) -> ScriptBatch:
    """Enqueues (``job_call``'s KEYS and ARGV) that arrive together, sent in one pipeline:
    the submit path's (``gateway/script_batch.py``). A run's answer is 1 if it queued the
    job, 0 if the job was already queued or running."""
    script = redis.register_script(_ENQUEUE)
    return ScriptBatch(redis, script, timeout_seconds, name="enqueue-batch")


def generation_call(
    queue_name: str, task_id: str, attempt: int, *, fresh: tuple[str, int] | None = None
) -> tuple[list[str], list[bytes | str | int]]:
    """The KEYS and ARGV of ``enqueue`` for the task's generation job.

    ``fresh``: a just-submitted task's (model, submission ms). The job carries them, and
    its first run asks nothing of PostgreSQL before it has an upstream slot
    (``workers/generate.py``): under a backlog most such runs only park.
    """
    kwargs: dict[str, object] = {} if fresh is None else {"model": fresh[0], "ticket_ms": fresh[1]}
    job_id = generate_job_id(task_id, attempt)
    return job_call(queue_name, GENERATE_JOB, (task_id, attempt), job_id, kwargs=kwargs)


async def enqueue_generation(redis: Redis, queue_name: str, task_id: str, attempt: int) -> bool:
    """Queue the task's generation job; False if that job is already queued or running."""
    return await _enqueue(redis, *generation_call(queue_name, task_id, attempt))


async def generation_in_progress(redis: ArqRedis, task_id: str, attempt: int) -> bool:
    """Whether arq has handed the task's generation job to a worker (alive or not)."""
    return bool(await redis.exists(arq_in_progress_key(generate_job_id(task_id, attempt))))


async def enqueue_callback(
    redis: Redis, queue_name: str, delivery_id: str, number: int, delay: float = 0
) -> bool:
    """Queue attempt ``number`` of a delivery, ``delay`` seconds from now."""
    return await _enqueue(redis, *callback_call(queue_name, delivery_id, number, delay))


def callback_call(
    queue_name: str, delivery_id: str, number: int, delay: float = 0
) -> tuple[list[str], list[bytes | str | int]]:
    """The KEYS and ARGV of ``enqueue`` for attempt ``number`` of a delivery."""
    job_id = callback_job_id(delivery_id, number)
    return job_call(queue_name, CALLBACK_JOB, (delivery_id, number), job_id, delay=delay)


async def enqueue_upstream_cancel(
    redis: Redis,
    queue_name: str,
    task_id: str,
    channel_id: str,
    upstream_job_id: str,
    reason: str = "cancel",
) -> bool:
    """Ask a worker to cancel an ended task's job at its upstream (best effort).

    ``reason``: ``cancel`` (the tenant cancelled) or ``deadline`` (the sweeper failed it).
    """
    args = (task_id, channel_id, upstream_job_id, reason)
    return await _enqueue(redis, *job_call(queue_name, CANCEL_JOB, args, cancel_job_id(task_id)))


async def enqueue_channel_test(
    redis: Redis, queue_name: str, channel_id: str, test_id: str
) -> bool:
    """Ask a worker to run one test generation on a channel (``workers/channel_test.py``)."""
    job_id = f"channel-test:{test_id}"
    return await _enqueue(
        redis, *job_call(queue_name, CHANNEL_TEST_JOB, (channel_id, test_id), job_id)
    )
