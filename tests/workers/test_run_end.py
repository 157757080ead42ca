"""A generation run's end in Redis (``workers/run_end.py``): its liveness record, its job
time, its callback's first attempt and its channels' circuits, in one command to a real
Redis."""

import logging
import pickle
import uuid
from collections.abc import AsyncIterator

import pytest
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from conftest import REDIS_URL, commands_of, free_port
from redis.asyncio import Redis

from gateway.logs import OutageLog
from gateway.redis_keys import (
    CALLBACK_JOB,
    callback_job_id,
    job_times_key,
    jobs_done_key,
    runs_key,
)
from workers import run_end
from workers.run_end import RunEnd, record_run_end

MODEL = "flux-1-schnell"


@pytest.fixture
async def queues() -> AsyncIterator[tuple[Redis, str, str]]:
    redis = Redis.from_url(REDIS_URL)
    queue, callbacks = f"test-run-end-{uuid.uuid4().hex[:8]}", f"test-cb-{uuid.uuid4().hex[:8]}"
    yield redis, queue, callbacks
    keys = [runs_key(queue), job_times_key(queue, MODEL), jobs_done_key(queue, MODEL), callbacks]
    await redis.delete(*keys, job_key_prefix + callback_job_id("dlv-1", 1))
    await redis.aclose()


async def test_a_runs_end_is_one_command_that_writes_all_four(
    queues: tuple[Redis, str, str],
) -> None:
    redis, queue, callbacks = queues
    await redis.hset(runs_key(queue), mapping={"task-a:0": "w1", "task-b:0": "w1"})
    circuit = [f"{queue}:circuit:{part}" for part in ("failures", "tripped", "probe")]
    await redis.mset({key: "1" for key in circuit})
    end = RunEnd(
        queue,
        callbacks,
        MODEL,
        holder="task-a:0",
        job_seconds=1.5,
        delivery_id="dlv-1",
        circuit_keys=tuple(circuit),
    )
    assert await commands_of(redis, record_run_end(redis, RunEnd(queue, callbacks, MODEL))) == []
    # Redis has the script from here on (a first call may load it: SCRIPT LOAD, EVALSHA).
    await record_run_end(redis, RunEnd(queue, callbacks, MODEL, holder="task-z:0"))

    assert await commands_of(redis, record_run_end(redis, end)) == ["EVALSHA"]
    assert await redis.hgetall(runs_key(queue)) == {b"task-b:0": b"w1"}
    assert await redis.exists(*circuit) == 0  # the channel that served it: circuit closed
    assert (await redis.lrange(job_times_key(queue, MODEL), 0, -1))[0] == b"1.500"
    assert int(await redis.get(jobs_done_key(queue, MODEL)) or 0) >= 1
    job_id = callback_job_id("dlv-1", 1)
    assert await redis.zscore(callbacks, job_id) is not None
    payload = pickle.loads(await redis.get(job_key_prefix + job_id) or b"")
    assert (payload["f"], payload["a"]) == (CALLBACK_JOB, ("dlv-1", 1))


async def test_each_part_is_optional(queues: tuple[Redis, str, str]) -> None:
    redis, queue, callbacks = queues
    await redis.hset(runs_key(queue), "task-a:0", "w1")
    # A failed run: its record goes; no job time, no callback.
    await record_run_end(redis, RunEnd(queue, callbacks, MODEL, holder="task-a:0"))
    assert await redis.hgetall(runs_key(queue)) == {}
    assert await redis.exists(job_times_key(queue, MODEL), jobs_done_key(queue, MODEL)) == 0
    assert await redis.zcard(callbacks) == 0
    # A run that made no record (liveness off) but has a callback.
    await record_run_end(redis, RunEnd(queue, callbacks, MODEL, delivery_id="dlv-1"))
    assert await redis.zcard(callbacks) == 1
    # Queued once: the same delivery's first attempt is not queued twice.
    await record_run_end(redis, RunEnd(queue, callbacks, MODEL, delivery_id="dlv-1"))
    assert await redis.zcard(callbacks) == 1
    # Only a circuit to close (two channels served it), with the callback after them.
    keys = [f"{queue}:circuit:{n}" for n in range(6)]
    await redis.mset({key: "1" for key in keys})
    await record_run_end(redis, RunEnd(queue, callbacks, MODEL, circuit_keys=tuple(keys[:3])))
    assert await redis.exists(*keys) == 3
    end = RunEnd(queue, callbacks, MODEL, delivery_id="dlv-2", circuit_keys=tuple(keys[3:]))
    await record_run_end(redis, end)
    assert await redis.exists(*keys) == 0
    assert await redis.zcard(callbacks) == 2
    await redis.delete(job_key_prefix + callback_job_id("dlv-2", 1))


async def test_a_redis_outage_is_logged_once_and_never_raised(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_end, "_outage", OutageLog(run_end.logger))  # no earlier warning
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    caplog.set_level(logging.DEBUG, logger="tollgate.generate")
    end = RunEnd("q", "cb", MODEL, holder="task-a:0", job_seconds=1.0, delivery_id="dlv-1")
    try:
        for _ in range(3):
            await record_run_end(redis, end)
    finally:
        await redis.aclose()
    levels = [r.levelname for r in caplog.records if "was not recorded" in r.getMessage()]
    assert levels[0] == "WARNING"
    assert levels[1:] == ["DEBUG", "DEBUG"]


async def test_arqs_finish_of_the_job_goes_with_the_runs_end(
    queues: tuple[Redis, str, str],
) -> None:
    """A job that ran to its end is finished with its run's end, in one command: its
    in-progress, retry and job keys deleted, out of its queue and the abort set."""
    redis, queue, callbacks = queues
    job_id = f"gen:task-{uuid.uuid4().hex[:8]}:0"
    keys = [in_progress_key_prefix + job_id, retry_key_prefix + job_id, job_key_prefix + job_id]
    await redis.mset({key: "1" for key in keys})
    await redis.zadd(queue, {job_id: 1, "gen:other:0": 2})
    await redis.zadd(abort_jobs_ss, {job_id: 1})
    await redis.hset(runs_key(queue), "task-a:0", "w1")
    end = RunEnd(queue, callbacks, MODEL, holder="task-a:0", job_seconds=0.5)
    await run_end.finish_with_run_end(redis, job_id, end)  # Redis has the script from here on

    await redis.mset({key: "1" for key in keys})
    await redis.zadd(queue, {job_id: 1})
    await redis.hset(runs_key(queue), "task-a:0", "w1")
    assert await commands_of(redis, run_end.finish_with_run_end(redis, job_id, end)) == ["EVALSHA"]
    assert await redis.exists(*keys) == 0
    assert await redis.zrange(queue, 0, -1) == [b"gen:other:0"]
    assert await redis.zscore(abort_jobs_ss, job_id) is None
    assert await redis.hgetall(runs_key(queue)) == {}
    assert (await redis.lrange(job_times_key(queue, MODEL), 0, -1))[:2] == [b"0.500", b"0.500"]
    await redis.delete(queue)
