"""Upstream slots: a cap on the jobs running at once on each upstream account.

An upstream account (``settings.upstreams[name]``) takes at most
``max_concurrency`` jobs at once; every worker process shares one counting
semaphore per account in Redis. Rules:

- **Holders.** A slot is held from before the submit until the last poll and
  the result download. Holders (``<task>:<attempt>``) are members of a sorted
  set scored by their lease's expiry in Redis's own clock (``TIME``), never a
  worker's. Renewing goes with the task's lease heartbeat, so a killed worker's
  slot frees itself within ``lease_seconds``.
- **Acquiring** is one Lua script: drop expired holders; grant a slot if one
  is free and nobody waits ahead; otherwise say how long to wait. A holder
  asking again keeps its slot (a repeated delivery of the same job).
- **Waiting is in order.** A refused job joins a line ordered by its task's
  submission time and asks again later (the job is re-queued, it holds no
  worker); a freed slot goes to the head of the line. A waiter that stops
  asking for ``waiter_ttl`` leaves the line, and gets its place back if it
  asks again, since its place is its task's submission time.
- **Back-off.** An upstream 429 blocks new slots on that account for its
  Retry-After (1 s without one); holders wait it out too.
- **Resuming.** An upstream job that already runs (a new attempt of a task
  whose worker died) takes its slot at once, even past the cap: it loads the
  upstream whether counted or not, so new submits wait until the count is
  back under the cap.

What the cap cannot see: a worker that dies holding a slot frees it after one
lease while its upstream job may still run, and a job given up at its deadline
may still run upstream. Both are bounded by the upstream's own job time.
"""

import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.redis_keys import (
    upstream_backoff_key,
    upstream_line_key,
    upstream_line_seen_key,
    upstream_slots_key,
)

logger = logging.getLogger("tollgate.upstream_slots")

DEFAULT_BACKOFF_SECONDS = 1.0
# A 429 with "Retry-After: 0" must not turn into a tight loop against the upstream.
MIN_BACKOFF_SECONDS = 0.1
# A Retry-After longer than this is likelier a bug than a plan; tasks would time out anyway.
MAX_BACKOFF_SECONDS = 600.0
# arq polls its queue every 50 ms: asking again sooner gains nothing.
MIN_WAIT_SECONDS = 0.05
# Waiters far back in the line ask less often, up to this many poll intervals apart.
MAX_WAIT_STEPS = 5

# KEYS: slots, line, line seen, back-off.
# ARGV: holder, cap, lease ms, ticket (task submission, ms), waiter ttl ms, running (0/1).
# Returns {status, back-off ms, rank in line, free slots, ms until the earliest expiry};
# status 1 = granted, 2 = already held (renewed), 0 = refused.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder, cap, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], holder)
if held or ARGV[6] == '1' then
  redis.call('ZADD', KEYS[1], now + lease, holder)
  redis.call('ZREM', KEYS[2], holder)
  redis.call('ZREM', KEYS[3], holder)
  return {held and 2 or 1, 0, 0, 0, 0}
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 100)
if #gone > 0 then
  redis.call('ZREM', KEYS[2], unpack(gone))
  redis.call('ZREM', KEYS[3], unpack(gone))
end
local backoff = redis.call('PTTL', KEYS[4])
if backoff < 0 then backoff = 0 end
local free = cap - redis.call('ZCARD', KEYS[1])
local rank = 0
if backoff > 0 or free <= 0 or redis.call('ZCARD', KEYS[2]) > 0 then
  redis.call('ZADD', KEYS[2], 'NX', ARGV[4], holder)
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), holder)
  rank = redis.call('ZRANK', KEYS[2], holder)
end
if backoff == 0 and rank < free then
  redis.call('ZADD', KEYS[1], now + lease, holder)
  redis.call('ZREM', KEYS[2], holder)
  redis.call('ZREM', KEYS[3], holder)
  return {1, 0, 0, 0, 0}
end
local earliest = -1
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first > 0 then earliest = tonumber(first[2]) - now end
return {0, backoff, rank, free, earliest}
"""

# KEYS: slots. ARGV: holder, lease ms. Returns 1 if the slot was still held.
# A slot that expired under a stalled worker is added back: its upstream job still runs.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return (expiry and tonumber(expiry) > now) and 1 or 0
"""


@dataclass(frozen=True, slots=True)
class Grant:
    acquired: bool
    # Refused: when to ask again.
    wait_seconds: float = 0.0
    # Granted to a holder that had the slot already: another delivery of the same job
    # may be running it, so a run that then finds the task taken must not release it.
    already_held: bool = False


def backoff_seconds(retry_after: float | None) -> float:
    """How long a 429 with this Retry-After (seconds, or None) holds the account back."""
    wait = DEFAULT_BACKOFF_SECONDS if retry_after is None else retry_after
    return min(max(wait, MIN_BACKOFF_SECONDS), MAX_BACKOFF_SECONDS)


class UpstreamSlots:
    def __init__(self, redis: Redis, *, lease_seconds: float, poll_seconds: float) -> None:
        self._redis = redis
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._step = max(MIN_WAIT_SECONDS, poll_seconds)
        self._max_wait = self._step * MAX_WAIT_STEPS
        self.waiter_ttl = max(lease_seconds, 4 * self._max_wait)

    async def acquire(
        self, upstream: str, holder: str, *, cap: int, ticket_ms: int, running: bool = False
    ) -> Grant:
        """Take a slot on ``upstream`` for ``holder``, or learn how long to wait for one.

        ``ticket_ms`` places the holder in the line (its task's submission time);
        ``running`` says its upstream job already runs (see the module's rules).
        """
        raw: list[Any] = await self._acquire(
            keys=[
                upstream_slots_key(upstream),
                upstream_line_key(upstream),
                upstream_line_seen_key(upstream),
                upstream_backoff_key(upstream),
            ],
            args=[
                holder,
                cap,
                self._lease_ms,
                ticket_ms,
                round(self.waiter_ttl * 1000),
                1 if running else 0,
            ],
        )
        status, backoff_ms, rank, free, earliest_ms = (int(v) for v in raw)
        if status:
            return Grant(acquired=True, already_held=status == 2)
        if backoff_ms > 0:
            wait = backoff_ms / 1000
        else:
            # Those ahead take the free slots first; the rest of the line waits in rounds of cap.
            ahead = max(0, rank - max(free, 0))
            wait = min(self._step * (1 + ahead // max(cap, 1)), self._max_wait)
            if free <= 0 and earliest_ms >= 0:
                wait = min(wait, earliest_ms / 1000)
        return Grant(acquired=False, wait_seconds=max(wait, MIN_WAIT_SECONDS))

    async def renew(self, upstream: str, holder: str) -> bool:
        """Extend the holder's slot by a lease; False if it had expired (it is held again now)."""
        try:
            held = await self._renew(
                keys=[upstream_slots_key(upstream)], args=[holder, self._lease_ms]
            )
        except RedisError as exc:
            # The slot expires on its own if this keeps failing; the task itself goes on.
            logger.warning("could not renew the %s slot of %s: %s", upstream, holder, exc)
            return True
        return bool(held)

    async def release(self, upstream: str, holder: str) -> None:
        """Give the slot back and leave the line; a no-op for a holder that has neither."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(upstream_slots_key(upstream), holder)
                pipe.zrem(upstream_line_key(upstream), holder)
                pipe.zrem(upstream_line_seen_key(upstream), holder)
                await pipe.execute()
        except RedisError as exc:
            # The lease frees the slot anyway; never hide the job's own outcome behind this.
            logger.warning("could not release the %s slot of %s: %s", upstream, holder, exc)

    async def back_off(self, upstream: str, retry_after: float | None) -> float:
        """Block new slots on ``upstream`` after a 429; returns the back-off in seconds."""
        wait = backoff_seconds(retry_after)
        try:
            await self._redis.set(upstream_backoff_key(upstream), b"1", px=round(wait * 1000))
        except RedisError as exc:
            logger.warning("could not back %s off: %s", upstream, exc)
        return wait
