"""The soak's sampler: once a second, what the upstream runs and what the queue holds.

Completions per bucket say that a drain dipped, not why. Beside them the soak prints,
per bucket, the means of what this thread reads each second:

- ``upstream``: jobs the simulator is running (its ``jobs_active``), against the slots;
- ``started``: upstream jobs submitted per second (the simulator's ``submits``, differenced);
- ``slots``: holders of the upstream slots in Redis, both accounts together;
- ``line``: tasks waiting in the slots' lines; ``queued``: jobs in arq's queue;
- ``open``: tasks pending or processing in PostgreSQL.

So a dip with ``slots`` full and ``upstream`` low is slots held by runs that are not
running a job; with ``line`` long and ``slots`` low, a line nobody serves; with ``queued``
long and ``slots`` low, workers not taking jobs. A value that could not be read (its
server was down) is left out of its bucket's mean.
"""

import asyncio
import contextlib
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.redis_keys import slot_name, upstream_line_key, upstream_slots_key

FIELDS = ("upstream", "started", "slots", "line", "queued", "open")


@dataclass
class Sampler:
    sim_url: str
    redis_url: str
    pg_url: str  # postgresql://…, as asyncpg takes it
    queue_name: str
    channels: tuple[str, ...]
    samples: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="soak-sampler")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        asyncio.run(self._sample())

    async def _sample(self) -> None:
        keys = [
            (upstream_slots_key(name), upstream_line_key(name))
            for name in (slot_name(self.queue_name, c) for c in self.channels)
        ]
        r = Redis.from_url(self.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        last_submits: int | None = None
        conn: asyncpg.Connection | None = None  # one, made again after PostgreSQL's stop
        async with httpx.AsyncClient(timeout=0.5, trust_env=False) as http:
            while not self._stop.is_set():
                await asyncio.sleep(1.0)
                sample: dict[str, Any] = {"at": time.time()}
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    stats = (await http.get(f"{self.sim_url}/_sim/stats")).json()
                    sample["upstream"] = stats["jobs_active"]
                    if last_submits is not None:
                        sample["started"] = stats["submits"] - last_submits
                    last_submits = stats["submits"]
                with contextlib.suppress(RedisError, OSError):
                    async with r.pipeline(transaction=False) as pipe:
                        for slots, line in keys:
                            pipe.zcard(slots)
                            pipe.zcard(line)
                        pipe.zcard(self.queue_name)
                        *pairs, queued = await pipe.execute()
                    sample["slots"] = sum(pairs[0::2])
                    sample["line"] = sum(pairs[1::2])
                    sample["queued"] = queued
                try:
                    if conn is None:
                        conn = await asyncpg.connect(self.pg_url, timeout=1)
                    sample["open"] = await conn.fetchval(
                        "SELECT count(*) FROM tasks WHERE status IN ('pending', 'processing')",
                        timeout=1,
                    )
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                    if conn is not None:
                        conn.terminate()
                    conn = None
                self.samples.append(sample)
        if conn is not None:
            await conn.close()
        await r.aclose()

    def buckets(self, started: float, bucket: int) -> dict[int, dict[str, float]]:
        """Per bucket index (as the completions timeline counts them), each field's mean."""
        grouped: dict[int, dict[str, list[float]]] = {}
        for sample in self.samples:
            i = int((sample["at"] - started) // bucket)
            if i < 0:
                continue
            for name in FIELDS:
                if sample.get(name) is not None:
                    grouped.setdefault(i, {}).setdefault(name, []).append(sample[name])
        return {
            i: {name: round(statistics.fmean(values), 1) for name, values in fields.items()}
            for i, fields in grouped.items()
        }
