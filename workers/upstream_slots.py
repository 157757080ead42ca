"""Upstream slots: a cap on the jobs running at once on each upstream account.

An upstream account (``settings.upstreams[name]``) takes at most
``max_concurrency`` jobs at once; every worker process shares one counting
semaphore per account in Redis. Rules (docs/architecture.md, "Upstream concurrency"):

- **Holders.** A slot is held from before the submit until the upstream job's
  end (its last poll); fetching and storing the results runs outside it, so
  the cap counts jobs on the account, and a slot never idles on our side.
  Holders (``<task>:<attempt>``) are members of a sorted set scored by their
  lease's expiry in Redis's own clock (``TIME``), never a worker's. Renewing
  goes with the task's lease heartbeat, so a killed worker's slot frees itself
  within ``lease_seconds``.
- **Acquiring** is one Lua script: drop expired holders, join the line (placed
  by the task's submission time), then hand the free slots to the head of the
  line. A holder asking again keeps its slot (a repeated delivery of the same
  job). Asked with the channel's circuit, the script reads it first and takes
  nothing unless it is closed (``workers/admission.py`` asks a half-open one
  for its probe, then again without it).
- **Parking, not polling.** A refused job leaves its wake-up job (arq's
  payload) with its place in the line and ends: a waiting task holds no worker
  and no retry loop, and costs nothing per second. Whoever frees a slot (a
  release, or the sweep that finds an expired lease or a lapsed back-off) runs
  the same hand-off in the same script: the head of the line gets the slot and
  its wake-up job is put in the queue, and the queue's workers are woken by a
  pub/sub message. The woken job finds the slot its own. It is queued at its
  task's submission time, not now: ahead of every job queued after that task
  (fresh tasks that will only park), so under a backlog a handed slot is used
  at once rather than after the whole queue has cycled.
- **Back-off.** An upstream 429 blocks new slots on that account for its
  Retry-After (1 s without one); holders wait it out too. The sweep hands the
  slots on once it lapses.
- **Resuming.** An upstream job that already runs (a new attempt of a task
  whose worker died) takes its slot at once, even past the cap: it loads the
  upstream whether counted or not, so new submits wait until the count is
  back under the cap.
- **Lost state.** If Redis loses the lines and the slots (its slots marker is
  gone), no slot is granted before the running tasks' slots are back: the
  acquire script answers "restore needed", and the caller puts them back from
  PostgreSQL (``restore``, ``workers/reconciler.py``'s ``restore_slots``),
  which sets the marker again last, before asking again. The reconciler
  does the same on its tick, then queues the pending tasks again; they park
  again in submission order.

What the cap cannot see: a worker that dies holding a slot frees it after one
lease while its upstream job may still run, and a job given up at its deadline
may still run upstream. Both are bounded by the upstream's own job time.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.redis_keys import (
    GENERATE_JOB,
    parked_key,
    queue_wake_channel,
    slot_lines_key,
    slots_epoch_key,
    upstream_backoff_key,
    upstream_cap_key,
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
# The shortest wait a run that must ask again is told (mid-run moves, open circuits).
MIN_WAIT_SECONDS = 0.05
# A wake-up job not started within a day is dropped (arq's default expiry).
_WAKE_EXPIRES_MS = 86_400_000

# Shared by every script. KEYS: 1 slots, 2 line, 3 wake-up jobs, 4 back-off, 5 cap,
# 6 the arq queue, 7 parked holders, 8 lines with waiters, 9 the slots marker.
# ARGV: 1 slot name, 2 lease ms, 3 arq job key prefix, 4 wake-up expiry ms, 5 wake channel.
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])

local function unpark(h)
  if redis.call('ZREM', KEYS[2], h) == 1 then
    if redis.call('HINCRBY', KEYS[7], h, -1) <= 0 then redis.call('HDEL', KEYS[7], h) end
  end
end

local function expire()
  local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
  for _, h in ipairs(gone) do
    if redis.call('HGET', KEYS[3], h) == '' then redis.call('HDEL', KEYS[3], h) end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end

-- Hand the free slots to the head of the line, waking each new holder's job;
-- returns whether `me` was handed one (it is asking now: no job to wake).
local function hand(me)
  expire()
  if redis.call('PTTL', KEYS[4]) > 0 then return false end
  local free = tonumber(redis.call('GET', KEYS[5]) or '0') - redis.call('ZCARD', KEYS[1])
  local got, woke = false, false
  while free > 0 do
    local head = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if #head == 0 then break end
    local h, ticket = head[1], head[2]
    unpark(h)
    redis.call('ZADD', KEYS[1], now + lease, h)
    local payload = redis.call('HGET', KEYS[3], h)
    redis.call('HSET', KEYS[3], h, '')
    if h == me then
      got = true
    elseif payload and payload ~= '' then
      local id = h .. ':w' .. now
      redis.call('PSETEX', ARGV[3] .. id, ARGV[4], payload)
      -- Scored by its ticket (the task's submission): ahead of every job queued after it.
      redis.call('ZADD', KEYS[6], ticket, id)
      woke = true
    end
    free = free - 1
  end
  if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[8], ARGV[1]) end
  if woke then redis.call('PUBLISH', ARGV[5], '1') end
  return got
end
"""

# ARGV 6..12: holder, cap, ticket (task submission, ms), running (0/1), wake-up payload
# ("" for a run that asks again by itself), check the marker (0/1), check the channel's
# circuit (0/1; KEYS 10, 11: its open and tripped keys). Returns {status, back-off ms};
# status 1 = granted, 2 = already held (renewed), 0 = waiting in the line, 3 = Redis lost
# its state (no marker): nothing done, the slots must be restored first; 4 = the circuit
# is open (the back-off is its time left), 5 = it is half-open: nothing done either.
_ACQUIRE = (
    _COMMON
    + """
if ARGV[11] == '1' and redis.call('EXISTS', KEYS[9]) == 0 then return {3, 0} end
if ARGV[12] == '1' then
  local open = redis.call('PTTL', KEYS[10])
  if open > 0 then return {4, open} end
  if redis.call('EXISTS', KEYS[11]) == 1 then return {5, 0} end
end
local holder = ARGV[6]
redis.call('SET', KEYS[5], ARGV[7])
expire()
local held = redis.call('ZSCORE', KEYS[1], holder)
if held or ARGV[9] == '1' then
  redis.call('ZADD', KEYS[1], now + lease, holder)
  unpark(holder)
  local handed = redis.call('HGET', KEYS[3], holder) == ''
  redis.call('HDEL', KEYS[3], holder)
  return {(held and not handed) and 2 or 1, 0}
end
if redis.call('ZADD', KEYS[2], 'NX', ARGV[8], holder) == 1 then
  redis.call('HINCRBY', KEYS[7], holder, 1)
end
redis.call('HSET', KEYS[3], holder, ARGV[10])
redis.call('SADD', KEYS[8], ARGV[1])
if hand(holder) then
  redis.call('HDEL', KEYS[3], holder)
  return {1, 0}
end
local backoff = redis.call('PTTL', KEYS[4])
if backoff < 0 then backoff = 0 end
return {0, backoff}
"""
)

# ARGV 6: holder. Gives its slot back and leaves the line, then hands free slots on.
_RELEASE = (
    _COMMON
    + """
redis.call('ZREM', KEYS[1], ARGV[6])
unpark(ARGV[6])
redis.call('HDEL', KEYS[3], ARGV[6])
hand('')
return 1
"""
)

# Hands on the slots freed by expired leases or a lapsed back-off.
_SWEEP = _COMMON + "\nhand('')\nreturn redis.call('ZCARD', KEYS[2])\n"

# KEYS: slots. ARGV: holder, lease ms. Returns 1 if the slot was still held.
# A slot that expired under a stalled worker is added back: its upstream job still runs.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return (expiry and tonumber(expiry) > now) and 1 or 0
"""

# KEYS: a channel's slots. ARGV: the holder, its successor. A dead run's slot passes to the
# task's next attempt with its lease as it was: the channel's count never changes.
_PASS_ON = """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], expiry, ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class Grant:
    acquired: bool
    # Refused: the run waits in the line. A parked run is woken by a job of its own; a
    # run that asks again by itself (``wake=False``) asks after this many seconds.
    wait_seconds: float = 0.0
    # Granted to a holder that had the slot already: another delivery of the same job
    # may be running it, so a run that then finds the task taken must not release it.
    already_held: bool = False
    # Asked with the channel's circuit, which is not closed: nothing was done. Open, for
    # ``wait_seconds`` more; half-open, the circuit's probe decides who may try it.
    circuit_open: bool = False
    circuit_half_open: bool = False


def backoff_seconds(retry_after: float | None) -> float:
    """How long a 429 with this Retry-After (seconds, or None) holds the account back."""
    wait = DEFAULT_BACKOFF_SECONDS if retry_after is None else retry_after
    return min(max(wait, MIN_BACKOFF_SECONDS), MAX_BACKOFF_SECONDS)


def wake_payload(holder: str, model: str | None = None, ticket_ms: int = 0) -> bytes:
    """The wake-up job of a parked holder (``<task>:<attempt>``): its generation job, with
    the task's model and ticket when known (the woken run then skips reading the task)."""
    task_id, _, attempt = holder.rpartition(":")
    now_ms = round(time.time() * 1000)
    kwargs = {} if model is None else {"model": model, "ticket_ms": ticket_ms}
    return serialize_job(GENERATE_JOB, (task_id, int(attempt)), kwargs, None, now_ms)


# Puts the running tasks' slots back after Redis lost them, setting the marker last.
Restore = Callable[[], Awaitable[object]]
_RESTORE_NEEDED = 3
_CIRCUIT_OPEN = 4
_CIRCUIT_HALF_OPEN = 5


class UpstreamSlots:
    def __init__(
        self,
        redis: Redis,
        *,
        lease_seconds: float,
        poll_seconds: float,
        queue_name: str,
        restore: Restore | None = None,
    ) -> None:
        """``restore`` rebuilds the running tasks' slots when Redis lost them (and sets
        the marker); without one (nothing is known to run), the marker is just set."""
        self._redis = redis
        self._restore = restore
        self._restoring = asyncio.Lock()
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._sweep = redis.register_script(_SWEEP)
        self._renew = redis.register_script(_RENEW)
        self._pass_on = redis.register_script(_PASS_ON)
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._step = max(MIN_WAIT_SECONDS, poll_seconds)
        self.queue_name = queue_name

    def _keys(self, upstream: str) -> list[str]:
        return [
            upstream_slots_key(upstream),
            upstream_line_key(upstream),
            upstream_line_seen_key(upstream),
            upstream_backoff_key(upstream),
            upstream_cap_key(upstream),
            self.queue_name,
            parked_key(self.queue_name),
            slot_lines_key(self.queue_name),
            slots_epoch_key(self.queue_name),
        ]

    def _args(self, upstream: str) -> list[Any]:
        return [
            upstream,
            self._lease_ms,
            job_key_prefix,
            _WAKE_EXPIRES_MS,
            queue_wake_channel(self.queue_name),
        ]

    async def acquire(
        self,
        upstream: str,
        holder: str,
        *,
        cap: int,
        ticket_ms: int,
        running: bool = False,
        wake: bool = True,
        model: str | None = None,
        circuit: tuple[str, str] | None = None,
    ) -> Grant:
        """Take a slot on ``upstream`` for ``holder``, or wait in its line for one.

        ``ticket_ms`` places the holder in the line (its task's submission time);
        ``running`` says its upstream job already runs (see the module's rules).
        Refused with ``wake``, the holder's generation job is queued when a slot is
        handed to it (carrying ``model`` and ``ticket_ms`` when ``model`` is given: see
        ``workers/generate.py``); without, the caller asks again after ``wait_seconds``.
        ``circuit``, the channel's circuit's open and tripped keys
        (``Circuits.state_keys``), is read first in the same round trip: a circuit that
        is not closed takes nothing (``Grant.circuit_open``, ``circuit_half_open``).
        """
        keys = self._keys(upstream)
        if circuit is not None:
            keys += circuit
        args = [
            *self._args(upstream),
            holder,
            cap,
            ticket_ms,
            1 if running else 0,
            wake_payload(holder, model, ticket_ms) if wake else b"",
        ]
        check_circuit = 0 if circuit is None else 1
        raw: list[Any] = await self._acquire(keys=keys, args=[*args, 1, check_circuit])
        status, backoff_ms = (int(v) for v in raw)
        if status == _RESTORE_NEEDED:
            # Redis lost the slots: count the running jobs again before granting any.
            await self._restore_lost()
            raw = await self._acquire(keys=keys, args=[*args, 0, check_circuit])
            status, backoff_ms = (int(v) for v in raw)
        if status == _CIRCUIT_OPEN:
            return Grant(acquired=False, wait_seconds=backoff_ms / 1000, circuit_open=True)
        if status == _CIRCUIT_HALF_OPEN:
            return Grant(acquired=False, circuit_half_open=True)
        if status:
            return Grant(acquired=True, already_held=status == 2)
        wait = backoff_ms / 1000 if backoff_ms > 0 else self._step
        return Grant(acquired=False, wait_seconds=max(wait, MIN_WAIT_SECONDS))

    async def _restore_lost(self) -> None:
        """Put the running tasks' slots back (once, however many runs ask at once)."""
        marker = slots_epoch_key(self.queue_name)
        async with self._restoring:
            if await self._redis.exists(marker):
                return  # restored meanwhile, here or by another worker
            if self._restore is not None:
                await self._restore()
            else:
                await self._redis.set(marker, b"1")

    async def renew(self, upstream: str, holder: str) -> bool:
        """Extend the holder's slot by a lease; False if it had expired (it is held again now)."""
        try:
            held = await self._renew(
                keys=[upstream_slots_key(upstream)], args=[holder, self._lease_ms]
            )
        except RedisError as exc:
            # The slot expires on its own if this keeps failing; the task itself goes on.
            logger.debug("could not renew the %s slot of %s: %s", upstream, holder, exc)
            return True
        return bool(held)

    async def pass_on(self, upstream: str, holder: str, successor: str) -> bool:
        """Give ``holder``'s slot to ``successor`` (the task's next attempt, resuming its
        upstream job); False if it held none."""
        moved = await self._pass_on(keys=[upstream_slots_key(upstream)], args=[holder, successor])
        return bool(moved)

    async def release(self, upstream: str, holder: str) -> None:
        """Give the slot back and leave the line, handing the slot to the head of the
        line; a no-op for a holder that has neither."""
        try:
            await self._release(keys=self._keys(upstream), args=[*self._args(upstream), holder])
        except RedisError as exc:
            # The lease frees the slot anyway; never hide the job's own outcome behind this.
            logger.debug("could not release the %s slot of %s: %s", upstream, holder, exc)

    async def sweep(self) -> int:
        """Hand on the slots that expired leases and lapsed back-offs freed, on every line
        of this queue with waiters; returns how many wait."""
        waiting = 0
        for raw in await self._redis.smembers(slot_lines_key(self.queue_name)):  # type: ignore[misc]
            upstream = raw.decode() if isinstance(raw, bytes) else str(raw)
            waiting += int(await self._sweep(keys=self._keys(upstream), args=self._args(upstream)))
        return waiting

    async def back_off(self, upstream: str, retry_after: float | None) -> float:
        """Block new slots on ``upstream`` after a 429; returns the back-off in seconds."""
        wait = backoff_seconds(retry_after)
        try:
            await self._redis.set(upstream_backoff_key(upstream), b"1", px=round(wait * 1000))
        except RedisError as exc:
            logger.warning("could not back %s off: %s", upstream, exc)
        return wait
