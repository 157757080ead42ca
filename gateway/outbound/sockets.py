"""The sockets under the pinned transport: connect only to checked addresses, on asyncio.

- ``PinnedBackend`` opens TCP connections to a host's checked addresses only
  (``transport.PinnedTransport`` builds it from a lookup's answer).
- ``AsyncioBackend`` is the one it opens them with (tests pass others): plain
  asyncio streams, TLS done by the running loop (uvloop's in the callback
  worker, in C), where httpcore's default (anyio) does TLS in Python and walks
  its attribute layers each time the pool asks an idle connection whether the
  server closed it (every kept connection, on every request and answer: with 32
  kept per receiver, a sixth of the callback worker's CPU).
"""

import asyncio
import ssl
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpcore

from gateway.outbound.addresses import ForbiddenAddress, IPAddress, host_key


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """TCP connections as asyncio streams: TLS by the running loop's own implementation."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no connection within {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise ForbiddenAddress("must not point at a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection as an asyncio reader and writer, errors as httpcore names them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(
        self,
        max_bytes: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(f"nothing read within {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(
        self,
        buffer: bytes,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(f"not written within {timeout} s") from exc
        except (OSError, RuntimeError) as exc:  # RuntimeError: written after the close
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            self._writer.close()
            raise httpcore.ConnectTimeout(f"no TLS handshake within {timeout} s") from exc
        except (OSError, ConnectionError) as exc:  # ssl.SSLError among them
            self._writer.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # The loop reads as data comes: an idle connection with something read (the
            # server's close above all) is what the pool asks about.
            reader = self._reader
            buffered = getattr(reader, "_buffer", b"")  # what was read and not yet taken
            return reader.at_eof() or reader.exception() is not None or bool(buffered)
        name = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        if name in ("ssl_object", "sockname", "peername", "socket"):
            return self._writer.get_extra_info(name)
        return None


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections to a host's checked addresses, trying them in order."""

    def __init__(
        self, pins: Mapping[str, Sequence[IPAddress]], inner: httpcore.AsyncNetworkBackend
    ) -> None:
        self._pins = {host_key(host): tuple(addresses) for host, addresses in pins.items()}
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = self._pins.get(host_key(host))
        if not addresses:
            raise ForbiddenAddress(f"must not point at a host that was not checked: {host}")
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            try:
                # An address, not a name: the inner backend has nothing left to look up.
                stream = await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
            else:
                return stream
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise ForbiddenAddress("must not point at a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
