"""Circuit breakers, one per channel, shared by every worker through Redis.

States, per channel:

- **closed**: tasks are routed to it. Each retryable failure (connect error,
  timeout, 5xx, a body we cannot read) counts; failures older than the window
  are forgotten, and a success forgets them all.
- **open**: ``threshold`` failures within ``window`` seconds open it for
  ``cooldown`` seconds; routing skips it while another channel can serve.
- **half-open**: after the cool-down one task at a time may try it (a probe
  held for one cool-down). A success closes the circuit; a failure opens it
  again at once, without waiting for ``threshold`` more.

A failure that says the channel itself is broken (401/403: the upstream refuses
its key) opens the circuit at once, without waiting for ``threshold``.

A 429 is not a failure here: it backs the channel off (``upstream_slots``) for
the upstream's Retry-After, which says when to come back. A 4xx that is the
request's fault says nothing about the channel either.

Redis errors never stop a task: a circuit that cannot be read counts as closed.
"""

import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway import metrics
from gateway.logs import OutageLog
from gateway.redis_keys import circuit_key

logger = logging.getLogger("tollgate.circuits")

# KEYS: failures, open, tripped. ARGV: threshold, window ms, cooldown ms.
# Returns 1 when this failure opened the circuit, else 0.
_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if n >= tonumber(ARGV[1]) or redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[3]) * 10 + tonumber(ARGV[2]))
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


# KEYS: probe. ARGV: holder. Deletes the probe only if this holder has it.
_RELEASE_PROBE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class CircuitState:
    open: bool
    # Seconds until an open circuit lets a probe through (0 when not open).
    retry_in: float = 0.0
    # Half-open, and this holder has the probe: it must end in success, failure or
    # release_probe, or nobody else may try the channel for a cool-down.
    probing: bool = False


class Circuits:
    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str,
        threshold: int,
        window_seconds: float,
        cooldown_seconds: float,
    ) -> None:
        self._redis = redis
        self._outage = OutageLog(logger)
        self._failure = redis.register_script(_FAILURE)
        self._release_probe = redis.register_script(_RELEASE_PROBE)
        self._namespace = namespace
        self._threshold = threshold
        self._window_ms = max(1, round(window_seconds * 1000))
        self._cooldown_ms = max(1, round(cooldown_seconds * 1000))

    def _key(self, channel: str, part: str) -> str:
        return circuit_key(self._namespace, channel, part)

    async def state(self, channel: str, holder: str) -> CircuitState:
        """Whether ``holder`` (a task's attempt) may use the channel now.

        Half-open, only one holder at a time gets through; asking again as the
        same holder keeps the probe.
        """
        try:
            open_key, tripped_key = self.state_keys(channel)
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.pttl(open_key)
                pipe.exists(tripped_key)
                open_ms, tripped = await pipe.execute()
            if open_ms is not None and int(open_ms) > 0:
                return CircuitState(open=True, retry_in=int(open_ms) / 1000)
            if not tripped:
                return CircuitState(open=False)
            probe = self._key(channel, "probe")
            taken = await self._redis.set(probe, holder, nx=True, px=self._cooldown_ms)
            if taken or await self._redis.get(probe) == holder.encode():
                return CircuitState(open=False, probing=True)
            left = await self._redis.pttl(probe)
            return CircuitState(open=True, retry_in=max(int(left), 1) / 1000)
        except RedisError as exc:
            self._outage.failed("could not read the circuit of channel %s: %s", channel, exc)
            return CircuitState(open=False)

    def state_keys(self, channel: str) -> tuple[str, str]:
        """The keys ``state`` reads first (open, tripped): the slot's grant reads them in its
        own round trip (``UpstreamSlots.acquire``) and asks ``state`` only when tripped."""
        return self._key(channel, "open"), self._key(channel, "tripped")

    async def release_probe(self, channel: str, holder: str) -> None:
        """Give up the half-open probe without an outcome (the run did not use the channel)."""
        try:
            await self._release_probe(keys=[self._key(channel, "probe")], args=[holder])
        except RedisError as exc:
            self._outage.failed("could not release the probe of channel %s: %s", channel, exc)

    async def failure(
        self, channel: str, name: str | None = None, *, at_once: bool = False
    ) -> bool:
        """Count a retryable failure; True when it opened the circuit.

        ``name`` labels the metric (the channel's name, as upstream metrics use).
        ``at_once`` opens the circuit now, whatever the threshold: a failure that says
        the channel itself is broken (the upstream refuses its key).
        """
        try:
            opened = await self._failure(
                keys=[
                    self._key(channel, "failures"),
                    self._key(channel, "open"),
                    self._key(channel, "tripped"),
                ],
                args=[1 if at_once else self._threshold, self._window_ms, self._cooldown_ms],
            )
            await self._redis.delete(self._key(channel, "probe"))
        except RedisError as exc:
            self._outage.failed("could not count a failure of channel %s: %s", channel, exc)
            return False
        if opened:
            logger.warning(
                "channel %s: circuit opened for %.1fs", channel, self._cooldown_ms / 1000
            )
            metrics.circuit_opened(name or channel)
        return bool(opened)

    def success_keys(self, channel: str) -> list[str]:
        """What a success deletes: the channel's failures, its trip and its probe. A run
        deletes them with its end, in that round trip (``workers/run_end.py``)."""
        return [
            self._key(channel, "failures"),
            self._key(channel, "tripped"),
            self._key(channel, "probe"),
        ]

    async def success(self, channel: str) -> None:
        """The channel answered well: close its circuit and forget its failures."""
        try:
            await self._redis.delete(*self.success_keys(channel))
        except RedisError as exc:
            self._outage.failed("could not reset the circuit of channel %s: %s", channel, exc)
