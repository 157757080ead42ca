"""A real HTTP server on loopback that answers with the bytes a test scripts."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from guard_cases import LOOPBACK


@dataclass
class RawServer:
    """Reads each request (head and a Content-Length body) and writes what ``answer`` gives
    for it: bytes, and whether to close the connection after them."""

    answer: Callable[[int, bytes], tuple[bytes, bool]]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed_by_client: int = 0
    port: int = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                data, close = self.answer(len(self.requests) - 1, head)
                writer.write(data)
                await writer.drain()
                if close:
                    return
        except ConnectionError:
            self.closed_by_client += 1
        finally:
            writer.close()

    def url(self, path: str = "/") -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()


@contextlib.asynccontextmanager
async def serving(
    answer: Callable[[int, bytes], tuple[bytes, bool]],
) -> AsyncIterator[RawServer]:
    server = RawServer(answer)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def always(data: bytes, close: bool = False) -> Callable[[int, bytes], tuple[bytes, bool]]:
    return lambda _n, _head: (data, close)
