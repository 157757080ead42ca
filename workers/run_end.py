"""A generation run's end in Redis: one script, one round trip.

When a run ends, up to four things are written to Redis, and each was its own round
trip (four of the ten or so a task cost the worker in Redis); arq's own finish of the job
(its keys deleted, out of its queue) goes with them, a fifth (``finish_with_run_end``, from
``ResilientWorker.finish_job``: the job stashes its end for it):

- its liveness record is removed (``workers/liveness.py``: the run no longer needs a
  watcher);
- the upstream job's time is pushed for the gateways' backlog estimate, and the model's
  finished-job count raised (``gateway/tasks/backlog.py``);
- the first attempt of its callback is queued (``gateway/queue.py``'s enqueue);
- the circuits of the channels that served it close: their failures, trip and probe go
  (``workers/circuits.py``).

Each part is optional (a run that never claimed its task has no record; a failed one has
no job time; a task without a callback URL has no delivery). None of it is money: if Redis
is away, the record is left to the dead-run sweep and the lease, the job time is lost, and
the callback reconciler queues the delivery from its row.
"""

import logging
from dataclasses import dataclass

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.logs import OutageLog
from gateway.queue import ENQUEUE_FUNCTION, callback_call
from gateway.redis_keys import job_times_key, jobs_done_key, runs_key
from gateway.tasks.backlog import JOB_TIMES_KEPT, JOB_TIMES_TTL_SECONDS

logger = logging.getLogger("tollgate.generate")

# KEYS: with arq's finish of the job (ARGV[1] = 5), its in-progress, retry and job keys,
# the abort set and the queue; then the runs hash, the model's job times, its finished-job
# count, the n circuit keys to delete, then (with a callback) the enqueue's three keys.
# ARGV: 5 or 0, the job's id ('' : none), the run's holder ('' : none), the job's seconds
# ('' : none), the times kept, their expiry (s), n, then the enqueue's five.
_END = (
    ENQUEUE_FUNCTION
    + """
local k = tonumber(ARGV[1])
if k > 0 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[2])
  redis.call('ZREM', KEYS[5], ARGV[2])
end
if ARGV[3] ~= '' then redis.call('HDEL', KEYS[k + 1], ARGV[3]) end
if ARGV[4] ~= '' then
  redis.call('LPUSH', KEYS[k + 2], ARGV[4])
  redis.call('LTRIM', KEYS[k + 2], 0, tonumber(ARGV[5]) - 1)
  redis.call('EXPIRE', KEYS[k + 2], ARGV[6])
  redis.call('INCR', KEYS[k + 3])
end
local n = tonumber(ARGV[7])
if n > 0 then redis.call('DEL', unpack(KEYS, k + 4, k + 3 + n)) end
k = k + 3 + n
if #KEYS > k then
  return enqueue(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[8], ARGV[9], ARGV[10], ARGV[11],
    ARGV[12])
end
return 0
"""
)

_outage = OutageLog(logger)


@dataclass(frozen=True, slots=True)
class RunEnd:
    """What a run's end writes to Redis (see the module docstring)."""

    queue_name: str
    callback_queue_name: str
    model: str
    holder: str | None = None  # its liveness record, when it made one
    job_seconds: float | None = None  # its upstream job's time, images stored
    delivery_id: str | None = None  # the callback delivery its end recorded
    circuit_keys: tuple[str, ...] = ()  # of the channels that served it: their circuits close

    def call(self, job_id: str | None = None) -> tuple[list[str], list[bytes | str | int]] | None:
        """The script's KEYS and ARGV, with arq's finish of ``job_id`` if given; None when
        there is nothing to write."""
        if (
            job_id is None
            and self.holder is None
            and self.job_seconds is None
            and self.delivery_id is None
            and not self.circuit_keys
        ):
            return None
        keys: list[str] = []
        if job_id is not None:
            keys += [
                in_progress_key_prefix + job_id,
                retry_key_prefix + job_id,
                job_key_prefix + job_id,
                abort_jobs_ss,
                self.queue_name,
            ]
        keys += [
            runs_key(self.queue_name),
            job_times_key(self.queue_name, self.model),
            jobs_done_key(self.queue_name, self.model),
            *self.circuit_keys,
        ]
        argv: list[bytes | str | int] = [
            0 if job_id is None else 5,
            job_id or "",
            self.holder or "",
            "" if self.job_seconds is None else f"{self.job_seconds:.3f}",
            JOB_TIMES_KEPT,
            JOB_TIMES_TTL_SECONDS,
            len(self.circuit_keys),
        ]
        if self.delivery_id is not None:
            job_keys, job_argv = callback_call(self.callback_queue_name, self.delivery_id, 1)
            keys += job_keys
            argv += job_argv
        return keys, argv


async def record_run_end(redis: Redis, end: RunEnd) -> None:
    """Write the run's end in one round trip; never raises (see the module docstring)."""
    found = end.call()
    if found is None:
        return
    keys, argv = found
    try:
        await redis.register_script(_END)(keys=keys, args=argv)
    except (RedisError, OSError) as exc:
        _outage.failed(
            "the end of run %s (model %s) was not recorded; the callback reconciler queues "
            "its delivery: %s",
            end.holder,
            end.model,
            exc,
        )


async def finish_with_run_end(redis: Redis, job_id: str, end: RunEnd) -> None:
    """arq's finish of a job that ran to its end (its keys deleted, out of the queue and the
    abort set, no result kept) and the run's end, in one round trip. Raises as arq's own
    finish would (the worker's job wrapper takes a Redis outage)."""
    found = end.call(job_id)
    assert found is not None
    keys, argv = found
    await redis.register_script(_END)(keys=keys, args=argv)
