"""The HTTP/1.1 exchange under every outbound request (``gateway/outbound/h1.py``), against a
real server on loopback that answers with the bytes each test scripts: framing (lengths,
chunks, a body that runs to the close), informational answers, kept and dropped connections,
cut answers, the pool's limits, and headers that would break the request's framing."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from raw_server import always, serving

from gateway import outbound
from gateway.outbound.sockets import AsyncioBackend


@contextlib.asynccontextmanager
async def client(**options: object) -> AsyncIterator[httpx.AsyncClient]:
    transport = outbound.StreamsTransport(**options)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, timeout=5) as http:
        yield http


async def test_a_chunked_answer_is_joined_and_its_connection_kept() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    async with serving(always(chunked)) as server, client() as http:
        answers = [await http.get(server.url(f"/{i}")) for i in range(3)]
    assert [a.text for a in answers] == ["abcde"] * 3
    assert server.connections == 1


async def test_a_body_without_length_runs_to_the_close_and_the_connection_is_not_kept() -> None:
    async with (
        serving(always(b"HTTP/1.1 200 OK\r\n\r\nall of it", close=True)) as server,
        client() as http,
    ):
        answers = [await http.get(server.url()) for _ in range(2)]
    assert [a.text for a in answers] == ["all of it"] * 2
    assert server.connections == 2


async def test_connection_close_and_http_1_0_end_the_connection() -> None:
    def answer(n: int, _head: bytes) -> tuple[bytes, bool]:
        if n % 2:
            return b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", True
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", True

    async with serving(answer) as server, client() as http:
        answers = [await http.get(server.url()) for _ in range(4)]
    assert [a.text for a in answers] == ["ok"] * 4
    assert server.connections == 4


async def test_informational_answers_are_skipped_for_the_final_one() -> None:
    data = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone"
    )
    async with serving(always(data)) as server, client() as http:
        answer = await http.post(server.url(), content=b"{}")
        again = await http.post(server.url(), content=b"{}")
    assert (answer.status_code, answer.text, answer.headers["x-final"]) == (201, "done", "yes")
    assert "link" not in answer.headers
    assert again.status_code == 201
    assert server.connections == 1


async def test_an_answer_cut_short_is_an_error_and_its_connection_goes() -> None:
    async with (
        serving(always(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", True)) as server,
        client() as http,
    ):
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
            await http.get(server.url())
    async with serving(always(b"", close=True)) as silent, client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await http.get(silent.url())


async def test_a_malformed_answer_is_a_protocol_error() -> None:
    async with serving(always(b"HTTP/1.1 abc nonsense\r\n\r\n", True)) as server, client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match="malformed response"):
            await http.get(server.url())


async def test_bytes_after_the_answer_leave_the_answer_and_drop_the_connection() -> None:
    # A 204 has no body whatever its headers say: the two bytes after it are nobody's.
    data = b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nok"
    async with serving(always(data)) as server, client() as http:
        answers = [await http.get(server.url()) for _ in range(3)]
    assert [(a.status_code, a.content) for a in answers] == [(204, b"")] * 3
    assert server.connections == 3


async def test_an_answer_left_unread_closes_its_connection() -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1_000_000
    async with serving(always(big)) as server, client() as http:
        async with http.stream("GET", server.url()) as response:
            async for chunk in response.aiter_bytes():
                assert len(chunk) <= 65_536  # a read at a time, never the whole body
                break
        finished = await http.get(server.url())
    assert len(finished.content) == 1_000_000
    assert server.connections == 2


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async with (
        serving(always(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as server,
        client() as http,
    ):
        with pytest.raises(httpx.LocalProtocolError, match="line break"):
            await http.get(server.url(), headers={"x-sig": "a\rInjected: yes"})
    assert server.connections == 0


async def test_past_its_connections_a_request_waits_its_turn_within_the_pool_timeout() -> None:
    async with (
        serving(always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as server,
        client(max_connections=1) as http,
    ):
        async with http.stream("GET", server.url()):
            with pytest.raises(httpx.PoolTimeout):
                await http.get(server.url(), timeout=httpx.Timeout(5, pool=0.05))
        assert (await http.get(server.url())).text == "ok"
    assert server.connections == 1


async def test_a_request_body_goes_with_its_length_in_one_piece() -> None:
    async with (
        serving(always(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as server,
        client() as http,
    ):

        async def parts() -> AsyncIterator[bytes]:
            yield b'{"a":'
            yield b"1}"

        await http.post(server.url(), content=parts())
        await http.post(server.url())
    streamed, empty = server.requests
    assert b"content-length: 7\r\n" in streamed.lower()
    assert streamed.endswith(b'{"a":1}')
    assert b"transfer-encoding" not in streamed.lower()
    assert b"content-length: 0\r\n" in empty.lower()


class HeldConnects(AsyncioBackend):
    """Connects only once ``go`` is set; keeps the streams it opened."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()
        self.streams: list[Any] = []

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> Any:
        self.waiting.set()
        await self.go.wait()
        stream = await super().connect_tcp(*args, **kwargs)
        self.streams.append(stream)
        return stream


async def test_a_connection_opened_as_its_pool_closes_is_closed_not_left_open() -> None:
    """A pool closed while a request connects (a host's transport replaced as a delivery
    runs): the request goes on, and its connection is closed once given back, not kept by
    a pool nobody will close again (an unclosed StreamWriter, a ResourceWarning whenever
    it is collected)."""
    backend = HeldConnects()
    transport = outbound.StreamsTransport(network_backend=backend)
    async with (
        serving(always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as server,
        httpx.AsyncClient(transport=transport, timeout=5) as http,
    ):
        request = asyncio.create_task(http.get(server.url()))
        await backend.waiting.wait()
        await transport.aclose()
        backend.go.set()
        answer = await request
        assert answer.text == "ok"
        # Closed now, not by a later close of the client (none comes for a replaced transport).
        assert len(backend.streams) == 1
        assert backend.streams[0]._writer.is_closing()
