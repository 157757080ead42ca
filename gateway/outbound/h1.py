"""HTTP/1.1 over kept connections: the exchange under every outbound request.

The workers' upstream calls, image downloads and callback deliveries are all small
HTTP/1.1 exchanges on kept connections. Under httpx, httpcore's pool and h11 spent about
350 µs of CPU on each, where the exchange itself is one write and a read or two parsed by
httptools, the parser the gateway's server already runs on (docs/performance.md, "Eighth
round"). ``H1Pool`` is that exchange and no more:

- **Connections** come from an httpcore network backend (``sockets.AsyncioBackend``, or the
  pinned one that connects only to checked addresses), so every rule of the package holds
  beneath it; TLS is verified against the URL's host. A connection is kept while the server
  keeps it (``Connection: close``, HTTP/1.0 and a body delimited by the close end it), for
  ``keepalive_expiry`` seconds idle at most, and is dropped when it has something to read
  while idle (the server closed it).
- **Limits**: at most ``max_connections`` exchanges at once (a request past them waits,
  within the pool timeout); at most ``max_keepalive_connections`` kept idle.
- **A request** is written in one write: head and body (the body is in memory; bodies we
  send are). No retries: a request that met a closed connection fails, as under httpcore
  with ``retries=0``: an upstream's submit is never sent twice.
- **A response** streams: its body comes in the chunks read (64 KiB at most at a time), and
  nothing more is read than the reader asks for, so a caller's cap bounds what a body costs.
  A response closed before its end closes its connection.

Errors are httpcore's (``transport._as_httpx_errors`` turns them into httpx's):
``PoolTimeout``, ``RemoteProtocolError`` for a malformed or cut answer, ``LocalProtocolError``
for a header that would break the request's framing, and the backend's own for the network.
"""

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import httpcore
import httptools

# One read's worth: also the most a response holds that its reader did not ask for.
READ_BYTES = 65_536
DEFAULT_PORTS = {b"http": 80, b"https": 443}

# (scheme, host, port), the host as the URL spells it (an IPv6 literal without brackets).
Origin = tuple[bytes, bytes, int]
Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds for each step; None waits as long as the caller's own budget allows."""

    connect: float | None = None
    read: float | None = None
    write: float | None = None
    pool: float | None = None


NO_TIMEOUTS = Timeouts()


def request_head(method: bytes, target: bytes, headers: Sequence[Header]) -> bytes:
    """The request line and headers; refuses what would let a value end its line early."""
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    head = b"".join(lines)
    # Every CR or LF must be one of the line ends written above, no more.
    if head.count(b"\n") != len(headers) + 2 or head.count(b"\r") != len(headers) + 2:
        raise httpcore.LocalProtocolError("a request header contains a line break")
    if b" " in target or not target:
        raise httpcore.LocalProtocolError("the request target is not valid")
    return head


class H1Connection:
    """One kept connection and httptools' parser of its answers (its callbacks below)."""

    def __init__(self, origin: Origin, stream: httpcore.AsyncNetworkStream) -> None:
        self.origin = origin
        self._stream = stream
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = b""
        self.headers: list[Header] = []
        self._chunks: list[bytes] = []
        self._waiting = False  # a request was sent and its answer is not over
        self._head_done = False
        self.done = False  # the answer's last byte was read
        self.reusable = False  # done, and the server keeps the connection
        self.closed = False
        self.idle_since = 0.0
        self._head_request = False
        self._trusted = True  # it never sent bytes nobody asked for

    # --- httptools' callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self._waiting:
            self._trusted = False  # bytes nobody asked for: never reused
        self.reason = b""
        self.headers = []

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # informational (103 Early Hints…): the answer follows
        self.status = status
        self._head_done = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if not self._head_done:
            return  # the end of an informational answer
        self.done = True
        self._waiting = False
        self.reusable = self._trusted and self._parser.should_keep_alive()

    # --- the exchange --------------------------------------------------------------------

    async def _read_some(self, timeout: float | None) -> bool:  # noqa: ASYNC109 - per read
        data = await self._stream.read(READ_BYTES, timeout)
        if not data:
            return False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise httpcore.RemoteProtocolError("the server switched protocols") from None
        except httptools.HttpParserError as exc:
            if self.done:
                # Bytes past the answer's end (a body sent with a 204, say): the answer
                # stands, the connection goes.
                self._trusted = self.reusable = False
                return True
            raise httpcore.RemoteProtocolError(f"malformed response: {exc}") from None
        if self._head_request and self._head_done and not self.done:
            # An answer to HEAD has no body whatever its headers say.
            self.done, self._waiting = True, False
        return True

    async def send(self, head: bytes, body: bytes, timeouts: Timeouts, head_only: bool) -> None:
        """Write the request and read its answer's status and headers."""
        self.status, self.reason, self.headers, self._chunks = 0, b"", [], []
        self._head_done = self.done = self.reusable = False
        self._head_request = head_only
        self._waiting = True
        await self._stream.write(head + body if body else head, timeouts.write)
        while not self._head_done:
            if not await self._read_some(timeouts.read):
                raise httpcore.RemoteProtocolError(
                    "the server closed the connection without answering"
                )
        if head_only and not self.done:
            self.done, self._waiting = True, False
        if head_only:
            self.reusable = False  # whatever body it meant is not read: start afresh next time

    async def body(self, timeouts: Timeouts) -> AsyncIterator[bytes]:
        """The answer's body, as read."""
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                for chunk in chunks:
                    yield chunk
            if self.done:
                return
            if not await self._read_some(timeouts.read):
                if not self._ends_at_close():
                    raise httpcore.RemoteProtocolError(
                        "peer closed connection without sending complete message body"
                    )
                self.done, self.reusable, self._waiting = True, False, False

    def _ends_at_close(self) -> bool:
        """A body with neither a length nor chunks runs to the connection's end."""
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return True

    def has_expired(self, now: float, expiry: float | None) -> bool:
        if expiry is not None and now - self.idle_since > expiry:
            return True
        # Something to read on an idle connection: the server closed it, or talks out of turn.
        return bool(self._stream.get_extra_info("is_readable"))

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await self._stream.aclose()


class H1Response:
    """An answer in progress: its head, and its body to be read (``chunks``) or dropped."""

    def __init__(self, pool: "H1Pool", connection: H1Connection, timeouts: Timeouts) -> None:
        self.status = connection.status
        self.reason = connection.reason
        self.headers = connection.headers
        self._pool = pool
        self._connection: H1Connection | None = connection
        self._timeouts = timeouts

    async def chunks(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        async for chunk in connection.body(self._timeouts):
            yield chunk

    async def read(self, max_bytes: int) -> bytes:
        """The body, cut at ``max_bytes`` (the rest is not read: the connection goes)."""
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) >= max_bytes:
                break
        return bytes(body[:max_bytes])

    async def aclose(self) -> None:
        """Give the connection back: kept if its answer was read to the end, else closed."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await self._pool._release(connection)


class H1Pool:
    """Kept HTTP/1.1 connections to any number of origins (see the module docstring)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        network_backend: httpcore.AsyncNetworkBackend,
        max_connections: int = 10,
        max_keepalive_connections: int | None = None,
        keepalive_expiry: float | None = None,
    ) -> None:
        self._ssl_context = ssl_context
        self._backend = network_backend
        self._turns = asyncio.Semaphore(max_connections)
        self._max_idle = (
            max_connections
            if max_keepalive_connections is None
            else (min(max_keepalive_connections, max_connections))
        )
        self._expiry = keepalive_expiry
        self._idle: dict[Origin, list[H1Connection]] = {}
        self._idle_count = 0
        self._active: set[H1Connection] = set()
        self._closed = False

    async def request(
        self,
        method: bytes,
        origin: Origin,
        target: bytes,
        headers: Sequence[Header],
        body: bytes = b"",
        timeouts: Timeouts = NO_TIMEOUTS,
    ) -> H1Response:
        """Send one request; its answer's head is read, its body is the caller's to read."""
        head = request_head(method, target, headers)
        try:
            async with asyncio.timeout(timeouts.pool):
                await self._turns.acquire()
        except TimeoutError:
            raise httpcore.PoolTimeout("no connection came free in time") from None
        connection: H1Connection | None = None
        try:
            connection = await self._idle_connection(origin) or await self._connect(
                origin, timeouts.connect
            )
            self._active.add(connection)
            await connection.send(head, body, timeouts, head_only=method == b"HEAD")
        except BaseException:
            if connection is not None:
                self._active.discard(connection)
                await connection.aclose()
            self._turns.release()
            raise
        return H1Response(self, connection, timeouts)

    async def _idle_connection(self, origin: Origin) -> H1Connection | None:
        kept = self._idle.get(origin)
        now = time.monotonic()
        while kept:
            connection = kept.pop()  # the most recently used: the likeliest still open
            self._idle_count -= 1
            if not connection.has_expired(now, self._expiry):
                return connection
            await connection.aclose()
        return None

    async def _connect(self, origin: Origin, timeout: float | None) -> H1Connection:  # noqa: ASYNC109
        scheme, host, port = origin
        name = host.decode("ascii")
        stream = await self._backend.connect_tcp(name, port, timeout=timeout)
        if scheme == b"https":
            try:
                stream = await stream.start_tls(
                    self._ssl_context, server_hostname=name, timeout=timeout
                )
            except BaseException:
                await stream.aclose()
                raise
        return H1Connection(origin, stream)

    async def _release(self, connection: H1Connection) -> None:
        # A closed pool keeps nothing: a request that was connecting as it closed (a host's
        # transport replaced or evicted mid-delivery) goes on, and its connection is closed
        # here; kept, nobody would close it again.
        self._active.discard(connection)
        self._turns.release()
        if not (connection.done and connection.reusable) or connection.closed or self._closed:
            await connection.aclose()
            return
        if self._idle_count >= self._max_idle:
            await self._close_oldest_idle()
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, []).append(connection)
        self._idle_count += 1

    async def _close_oldest_idle(self) -> None:
        oldest: list[H1Connection] | None = None
        for kept in self._idle.values():
            if kept and (oldest is None or kept[0].idle_since < oldest[0].idle_since):
                oldest = kept
        if oldest:
            self._idle_count -= 1
            await oldest.pop(0).aclose()

    def __len__(self) -> int:
        """Connections open: kept idle and in use."""
        return self._idle_count + len(self._active)

    async def aclose(self) -> None:
        """Close every connection; one still connecting is closed once given back."""
        self._closed = True
        idle, self._idle, self._idle_count = self._idle, {}, 0
        for kept in idle.values():
            for connection in kept:
                await connection.aclose()
        for connection in list(self._active):
            await connection.aclose()


def origin_of(scheme: bytes, host: bytes, port: int | None) -> Origin:
    return (scheme, host, port or DEFAULT_PORTS.get(scheme, 80))
