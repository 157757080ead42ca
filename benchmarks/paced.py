"""An open-loop load at a steady rate: requests evenly spaced in time, each sent when it
is due on a free keep-alive connection (a new one when none is free), never waiting for
earlier answers, so a slow server cannot slow the load down and hide its queue. Each
latency runs from the request's write to the end of its response.

Why not hey: hey's ``-q`` paces each of its ``-c`` workers with a ticker of its own, and
the tickers start together, so at 700/s with 14 workers the server gets 14 requests at
once every 20 ms, not one every 1.4 ms: its latency "at half the maximum rate" was the
time to serve a burst of 14 (docs/performance.md, seventh round).

``python -m benchmarks.paced URL --rate R --seconds S [--method M] [--header H]...
[--body JSON] [--dump FILE]`` prints one JSON object: ``rate`` (offered), ``requests``,
``non_2xx``, ``errors``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms``, ``connections``
(opened) and ``late_p99_ms`` (how late this client sent, by its own clock: the event
loop's timers tick in milliseconds, so about 1 ms is its floor). ``--dump`` writes each
request's send time (wall clock, s) and latency (ms), one per line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import uvloop


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    sends: list[float] = field(default_factory=list)
    non_2xx: int = 0
    errors: int = 0


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, idle: deque[Connection], tally: Tally) -> None:
        self.idle = idle
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sent = 0.0
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def send(self, request: bytes, done: asyncio.Future[None]) -> None:
        assert self.transport is not None
        self.done = done
        self.sent = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail()

    def on_message_complete(self) -> None:
        self.tally.latencies.append(time.perf_counter() - self.sent)
        self.tally.sends.append(self.sent)
        if not 200 <= self.parser.get_status_code() < 300:
            self.tally.non_2xx += 1
        done, self.done = self.done, None
        self.idle.append(self)
        if done is not None and not done.done():
            done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        self.fail()

    def fail(self) -> None:
        if self.done is not None and not self.done.done():
            self.tally.errors += 1
            self.done.set_result(None)
        self.done = None
        if self.transport is not None:
            self.transport.close()


def request_bytes(url: str, method: str, headers: list[str], body: str | None) -> bytes:
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += headers
    payload = (body or "").encode()
    if body is not None:
        lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = request_bytes(args.url, args.method, args.header, args.body)
    idle: deque[Connection] = deque()
    tally = Tally()
    opened = 0

    async def one(due: float) -> None:
        nonlocal opened
        tally.lateness.append(time.perf_counter() - due)
        if idle:
            conn = idle.popleft()
        else:
            opened += 1
            try:
                _, conn = await loop.create_connection(lambda: Connection(idle, tally), host, port)
            except OSError:
                tally.errors += 1
                return
        done: asyncio.Future[None] = loop.create_future()
        conn.send(request, done)
        await done

    count = max(1, round(args.rate * args.seconds))
    period = 1.0 / args.rate
    pending: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.05
    wall0 = time.time() + 0.05
    for i in range(count):
        due = start + i * period
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        task = loop.create_task(one(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        _, unanswered = await asyncio.wait(pending, timeout=60)
        for task in unanswered:
            task.cancel()
        tally.errors += len(unanswered)
    for conn in list(idle):
        if conn.transport is not None:
            conn.transport.close()
    ms = [s * 1000 for s in tally.latencies]
    if args.dump is not None:
        # Wall-clock seconds of each send and its latency: slow answers in bunches are a
        # stall somewhere (compare with the servers' logs); spread out, a queue.
        pairs = zip(tally.sends, ms, strict=True)
        lines = (f"{sent - start + wall0:.6f} {took:.3f}\n" for sent, took in pairs)
        args.dump.write_text("".join(lines))
    return {
        "rate": args.rate,
        "requests": len(ms),
        "non_2xx": tally.non_2xx,
        "errors": tally.errors,
        "p50_ms": round(percentile(ms, 0.50), 2) if ms else None,
        "p90_ms": round(percentile(ms, 0.90), 2) if ms else None,
        "p99_ms": round(percentile(ms, 0.99), 2) if ms else None,
        "max_ms": round(max(ms), 2) if ms else None,
        "connections": opened,
        "late_p99_ms": round(percentile([s * 1000 for s in tally.lateness], 0.99), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--body", help="the request's body (a POST's JSON)")
    parser.add_argument("--dump", type=Path, help="write each request's send time and latency")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0:
        parser.error("--rate and --seconds must be positive")
    result = uvloop.run(drive(args))
    json.dump(result, sys.stdout)
    print()
    return 0 if result["requests"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
