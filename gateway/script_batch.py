"""Runs of one Lua script that arrive together go to Redis together.

Every authenticated request runs the rate limits' GCRA script once
(``gateway/limits/service.py``); every submit runs the enqueue script once
(``gateway/queue.py``). Alone, each run is a round trip of its own: a write, a
wait for Redis to be scheduled, a read. ``ScriptBatch`` sends the runs that are
waiting in one pipeline (one write, one read for all of them) and, while that
pipeline is out, gathers the next ones. A lone run is sent at once; under load
the batches grow by themselves.

Rules:

- Each run is still its own ``EVALSHA``: atomic on its own keys, done in full or
  not at all. Batching changes when runs are sent, never what one does.
- A batch that fails, or that Redis does not answer within ``timeout_seconds``,
  fails each of its runs with that error; each caller handles it as it would an
  unbatched run's (a 503 for a rate-limit check, the reconciler for an enqueue).
- A caller that stops waiting (its own timeout, a client gone) is skipped when
  its answer comes; its run still happened, as an unbatched one already sent
  would have.
"""

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Arg = bytes | str | int  # a script argument: redis-py encodes an int as its digits


class ScriptBatch:
    def __init__(
        self, redis: Redis, script: AsyncScript, timeout_seconds: float, name: str
    ) -> None:
        self._redis = redis
        self._script = script
        self._timeout = timeout_seconds
        self._name = name  # its sender task's
        self._waiting: list[tuple[Sequence[str], Sequence[Arg], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0  # pipelines sent (tests, profiling)

    async def run(self, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """The script's answer for ``keys`` and ``args``, sent with whatever else waits."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((keys, args, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_waiting(), name=self._name)
        return await answer

    async def _send_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            self.batches += 1
            try:
                async with asyncio.timeout(self._timeout):
                    results = await self._send(batch)
            except Exception as exc:  # every run of the batch fails with it
                results = [exc] * len(batch)
            for (_, _, answer), result in zip(batch, results, strict=True):
                if answer.done():  # its caller stopped waiting
                    continue
                if isinstance(result, BaseException):
                    answer.set_exception(result)
                else:
                    answer.set_result(result)

    async def _send(self, batch: list[tuple[Sequence[str], Sequence[Arg], Any]]) -> list[Any]:
        """One pipeline of EVALSHAs (no SCRIPT EXISTS first: that would be a second round
        trip each time). Runs Redis refused for want of the script (a restarted Redis)
        did nothing: they are sent again once it is loaded."""
        results = await self._pipeline([(keys, args) for keys, args, _ in batch])
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            await self._redis.script_load(self._script.script)
            again = await self._pipeline([(batch[i][0], batch[i][1]) for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, runs: list[tuple[Sequence[str], Sequence[Arg]]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in runs:
                # evalsha's own signature types every argument as str; Redis takes bytes
                pipe.execute_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
