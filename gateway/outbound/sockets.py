"""The sockets under the pinned transport: connect only to checked addresses, cheaply kept.

- ``PinnedBackend`` opens TCP connections to a host's checked addresses only
  (``transport.PinnedTransport`` builds it from a lookup's answer).
- ``KeptStream`` wraps each connection so that the pool's check of its idle
  connections ("has the server closed this one?", asked of every kept
  connection on every request and every answer) is one ``poll`` of the socket,
  not a walk through anyio's attribute layers for each: with 32 connections
  kept per receiver, that walk was a sixth of the callback worker's CPU.
"""

import select
import ssl
from collections.abc import Iterable, Mapping, Sequence
from socket import socket
from typing import Any

import httpcore

from gateway.outbound.addresses import ForbiddenAddress, IPAddress, host_key


def is_socket_readable(sock: socket) -> bool:
    """Whether the socket has data or an end to read now (a closed socket counts as readable)."""
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class KeptStream(httpcore.AsyncNetworkStream):
    """A network stream whose ``is_readable`` asks its socket directly (else as before)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket | None = inner.get_extra_info("socket")

    async def read(
        self,
        max_bytes: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(
        self,
        buffer: bytes,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> httpcore.AsyncNetworkStream:
        return KeptStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._socket is not None:
            return is_socket_readable(self._socket)  # what anyio's stream answers, directly
        return self._inner.get_extra_info(info)


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
                return KeptStream(stream)
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
