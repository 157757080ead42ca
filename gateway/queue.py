"""Enqueueing work for the workers: the gateway's only way to reach them."""

import logging

from arq.connections import ArqRedis

from gateway.redis_keys import (
    CALLBACK_JOB,
    CANCEL_JOB,
    GENERATE_JOB,
    callback_job_id,
    cancel_job_id,
    generate_job_id,
)

logger = logging.getLogger("tollgate.queue")


async def enqueue_generation(redis: ArqRedis, queue_name: str, task_id: str, attempt: int) -> bool:
    """Queue the task's generation job; False if that job is already queued or running."""
    job = await redis.enqueue_job(
        GENERATE_JOB,
        task_id,
        attempt,
        _job_id=generate_job_id(task_id, attempt),
        _queue_name=queue_name,
    )
    return job is not None


async def enqueue_callback(
    redis: ArqRedis, queue_name: str, delivery_id: str, number: int, delay: float = 0
) -> bool:
    """Queue attempt ``number`` of a delivery, ``delay`` seconds from now."""
    job = await redis.enqueue_job(
        CALLBACK_JOB,
        delivery_id,
        number,
        _job_id=callback_job_id(delivery_id, number),
        _queue_name=queue_name,
        _defer_by=delay or None,
    )
    return job is not None


async def enqueue_upstream_cancel(
    redis: ArqRedis, queue_name: str, task_id: str, channel_id: str, upstream_job_id: str
) -> bool:
    """Ask a worker to cancel a cancelled task's job at its upstream (best effort)."""
    job = await redis.enqueue_job(
        CANCEL_JOB,
        task_id,
        channel_id,
        upstream_job_id,
        _job_id=cancel_job_id(task_id),
        _queue_name=queue_name,
    )
    return job is not None
