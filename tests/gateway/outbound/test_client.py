"""The workers' upstream client (``gateway/outbound/client.py``): a plain request goes past
httpx's client and arrives as httpx would have sent it; any other takes httpx's way; no
cookie is kept; a redirect is not followed. Against a real server on loopback."""

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from raw_server import always, serving

from gateway import outbound

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


@contextlib.asynccontextmanager
async def upstream_client() -> AsyncIterator[outbound.OutboundClient]:
    transport = outbound.StreamsTransport(max_connections=4)
    async with outbound.OutboundClient(transport, timeout=httpx.Timeout(5)) as client:
        yield client


def header(request: bytes, name: bytes) -> bytes | None:
    for line in request.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def test_a_json_call_arrives_as_httpx_would_send_it() -> None:
    async with serving(always(OK)) as server, upstream_client() as client:
        async with client.stream(
            "POST",
            server.url("/v1/images?model=x"),
            json={"prompt": "a cat", "n": 2, "note": "é"},
            headers={"Authorization": "Bearer key"},
        ) as response:
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
        with httpx.Client() as plain:
            expected = plain.build_request(
                "POST", "http://x/", json={"prompt": "a cat", "n": 2, "note": "é"}
            )
    assert (response.status_code, body) == (200, b'{"ok":true}')
    (sent,) = server.requests
    assert sent.startswith(b"POST /v1/images?model=x HTTP/1.1\r\n")
    assert sent.endswith(expected.content)
    assert header(sent, b"content-type") == b"application/json"
    assert header(sent, b"content-length") == str(len(expected.content)).encode()
    assert header(sent, b"authorization") == b"Bearer key"
    assert header(sent, b"host") == f"127.0.0.1:{server.port}".encode()


async def test_a_request_with_params_takes_httpxs_way_and_still_arrives() -> None:
    async with (
        serving(always(OK)) as server,
        upstream_client() as client,
        client.stream("GET", server.url("/jobs"), params={"id": "7"}) as response,
    ):
        await response.aread()
    assert response.json() == {"ok": True}
    assert server.requests[0].startswith(b"GET /jobs?id=7 HTTP/1.1\r\n")


async def test_a_redirect_is_answered_not_followed_and_no_cookie_is_kept() -> None:
    data = (
        b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.test/\r\n"
        b"Set-Cookie: session=abc\r\nContent-Length: 0\r\n\r\n"
    )
    async with serving(always(data)) as server, upstream_client() as client:
        for _ in range(2):
            async with client.stream("GET", server.url("/")) as response:
                assert response.status_code == 302
    assert len(client.cookies) == 0
    assert all(header(sent, b"cookie") is None for sent in server.requests)
    assert server.connections == 1


async def test_a_call_past_its_read_limit_times_out_as_httpx_says() -> None:
    # The server reads the request, answers nothing and keeps the connection open.
    async with serving(always(b"")) as server, upstream_client() as client:
        with pytest.raises(httpx.ReadTimeout):
            async with client.stream("GET", server.url("/"), timeout=0.2):
                pass
