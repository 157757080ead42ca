"""Which generation worker runs which task, and which workers are alive: a killed worker's
tasks go on within seconds, not when their leases run out.

A task's lease (``workers/lease.py``) is renewed every third of
``lease_seconds`` (30 s), so a worker killed with ``kill -9`` leaves its tasks,
and their upstream slots, idle until the lease runs out and the reconciler's
next tick hands them on: up to 40 s of a channel's capacity gone. Liveness
finds the death sooner:

- every worker process beats once a second: its id and the time, in the
  queue's ``workers`` sorted set (``beat``);
- a run that claimed its task says so (``running``: "<task>:<attempt>" → the
  worker's id, in the queue's ``runs`` hash) and unsays it at its end (``done``);
- every second, each worker looks for runs whose worker has not beaten for
  ``worker_dead_after_seconds`` (``dead_runs``). The reconciler hands those
  tasks on at once (``workers/reconciler.reap_dead_runs``) — but only a task
  whose upstream job id is recorded: the next attempt resumes that job. A run
  that may be in the middle of its submit keeps its lease until it runs out, so
  that a worker only slow to beat (a stalled loop, a partition from Redis) can
  never have its task submitted twice.

A worker wrongly found dead loses nothing but the task: its next write finds
the lease gone (``LeaseLost``) and it stops, while the next attempt polls the
same upstream job. A worker absent from the set (Redis lost its state) is not
taken for dead; its leases cover it.
"""

import uuid

from redis.asyncio import Redis

from gateway.redis_keys import runs_key, workers_key

# KEYS: the workers set. ARGV: worker id. Its score: Redis's clock (ms), so the workers'
# clocks need not agree.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], now, ARGV[1])
"""

# KEYS: the workers set, the runs hash. ARGV: dead after (ms). Returns the runs of workers
# silent that long, as holder, worker, holder, worker, …; workers silent ten times that
# long, with no run left, are dropped from the set.
_DEAD_RUNS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead_after = tonumber(ARGV[1])
local dead = {}
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - dead_after)) do
  dead[worker] = true
end
local found = {}
local runs = redis.call('HGETALL', KEYS[2])
for i = 1, #runs, 2 do
  if dead[runs[i + 1]] then
    found[#found + 1] = runs[i]
    found[#found + 1] = runs[i + 1]
  end
end
if #found == 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - dead_after * 10)
end
return found
"""


class Liveness:
    """One worker process's beat, its runs, and the runs of workers that stopped beating."""

    def __init__(self, redis: Redis, queue_name: str, dead_after_seconds: float) -> None:
        self.worker_id = uuid.uuid4().hex[:16]
        self._redis = redis
        self._workers = workers_key(queue_name)
        self._runs = runs_key(queue_name)
        self._dead_after_ms = round(dead_after_seconds * 1000)
        self._beat = redis.register_script(_BEAT)
        self._dead_runs = redis.register_script(_DEAD_RUNS)

    async def beat(self) -> None:
        await self._beat(keys=[self._workers], args=[self.worker_id])

    async def running(self, holder: str) -> None:
        """This worker's run ``holder`` ("<task>:<attempt>") claimed its task."""
        await self._redis.hset(self._runs, holder, self.worker_id)  # type: ignore[misc]

    async def done(self, holder: str) -> None:
        await self._redis.hdel(self._runs, holder)  # type: ignore[misc]

    async def dead_runs(self) -> list[tuple[str, str]]:
        """(holder, worker) of the runs whose worker has not beaten for the set time."""
        found = await self._dead_runs(keys=[self._workers, self._runs], args=[self._dead_after_ms])
        pairs = [item.decode() if isinstance(item, bytes) else item for item in found]
        return list(zip(pairs[::2], pairs[1::2], strict=True))

    async def forget(self, holders: list[str]) -> None:
        """The runs ``holders`` were dealt with (handed on, or left to their leases)."""
        if holders:
            await self._redis.hdel(self._runs, *holders)  # type: ignore[misc]
