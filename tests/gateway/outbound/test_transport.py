"""Sending to what was checked (``gateway/outbound/transport.py``): one lookup, pinned
connections, TLS by name, no proxy, no redirect, a time budget and a cut body.

Every network test talks to listeners on 127.0.0.1 (the real HTTPS receiver of
``tests/https_receiver.py``). Public addresses are only classified, never contacted:
where a test needs the guard to "connect" to one, a recording network backend takes
the connection and opens nothing."""

import asyncio
import contextlib
import ipaddress
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpcore
import httpx
import pytest
from guard_cases import LOOPBACK, REFUSED, ScriptedResolver
from https_receiver import Answer, Cert, LoopbackOnlyBackend, Receiver

from gateway import outbound
from gateway.outbound import ForbiddenAddress
from gateway.outbound.sockets import AsyncioBackend


@pytest.mark.parametrize(("url", "words"), REFUSED)
async def test_guarded_post_refuses_before_looking_up_or_connecting(url: str, words: str) -> None:
    backend = LoopbackOnlyBackend()
    with pytest.raises(ForbiddenAddress, match=re.escape(words)):
        await outbound.guarded_post(
            url,
            content=b"{}",
            headers={},
            timeout=5,
            resolver=ScriptedResolver(),
            network_backend=backend,
        )
    assert backend.connects == []


# --- A real HTTPS receiver on loopback -------------------------------------


@dataclass
class Listener:
    """A plain TCP listener on 127.0.0.1 that only counts connections."""

    connections: int = 0
    port: int = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._count, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _count(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    server = Listener()
    await server.start()
    yield server
    await server.close()


RECEIVER = frozenset({"receiver.test"})


async def post_to_receiver(
    receiver: Receiver,
    cert: Cert,
    *,
    host: str = "receiver.test",
    answers: list[list[str]] | None = None,
    trust_cert: bool = True,
    seconds: float = 5,
) -> httpx.Response:
    return await outbound.guarded_post(
        f"https://{host}:{receiver.port}/hook?n=1",
        content=b'{"id": "task_1"}',
        headers={"content-type": "application/json", "webhook-id": "d_1"},
        timeout=seconds,
        resolver=ScriptedResolver(answers or [[LOOPBACK]]),
        allowed_hosts=frozenset({host}),
        ca_bundle=cert.cert if trust_cert else None,
    )


async def test_delivery_connects_to_the_checked_address_and_verifies_tls_by_name(
    receiver: Receiver, cert: Cert
) -> None:
    response = await post_to_receiver(receiver, cert)

    assert response.status_code == 200
    assert response.content == b"ok"
    assert receiver.server_names == ["receiver.test"]  # SNI: the name, not the address
    [request] = receiver.arrivals
    assert (request.method, request.target) == ("POST", "/hook?n=1")
    assert request.headers["host"] == f"receiver.test:{receiver.port}"
    assert request.headers["webhook-id"] == "d_1"
    assert request.headers["accept-encoding"] == "identity"
    assert request.body == b'{"id": "task_1"}'


async def test_tls_fails_for_a_name_the_certificate_does_not_cover(
    receiver: Receiver, cert: Cert
) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await post_to_receiver(receiver, cert, host="other.test")
    assert receiver.connections == 1
    assert receiver.arrivals == []


async def test_tls_fails_without_the_ca_bundle(receiver: Receiver, cert: Cert) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await post_to_receiver(receiver, cert, trust_cert=False)
    assert receiver.arrivals == []


async def test_rebinding_cannot_redirect_the_connection(listener: Listener) -> None:
    # First lookup public, a second would say loopback: the guard looks up once
    # and aims only at what it checked. The public address is not contacted: the
    # recording backend takes the connection.
    resolver = ScriptedResolver([["93.184.216.34"], [LOOPBACK]])
    backend = LoopbackOnlyBackend()
    with pytest.raises(httpx.ConnectError, match="recorded, not contacted"):
        await outbound.guarded_post(
            f"https://rebind.test:{listener.port}/hook",
            content=b"{}",
            headers={},
            timeout=5,
            resolver=resolver,
            network_backend=backend,
        )
    assert resolver.lookups == ["rebind.test"]
    assert backend.connects == [("93.184.216.34", listener.port)]
    assert listener.connections == 0


async def test_rebinding_to_loopback_on_the_first_lookup_is_refused(listener: Listener) -> None:
    resolver = ScriptedResolver([[LOOPBACK], ["93.184.216.34"]])
    refusal = re.escape("rebind.test resolves to a loopback address")
    with pytest.raises(ForbiddenAddress, match=refusal):
        await outbound.guarded_post(
            f"https://rebind.test:{listener.port}/hook",
            content=b"{}",
            headers={},
            timeout=5,
            resolver=resolver,
        )
    assert resolver.lookups == ["rebind.test"]
    assert listener.connections == 0


async def test_an_allowed_host_connects_to_the_first_answer_not_a_later_one(
    receiver: Receiver, cert: Cert
) -> None:
    # 127.0.0.2 has no listener: reaching the receiver proves the first answer was used.
    response = await post_to_receiver(receiver, cert, answers=[[LOOPBACK], ["127.0.0.2"]])
    assert response.status_code == 200
    assert len(receiver.arrivals) == 1


async def test_the_next_checked_address_is_tried_when_one_refuses(
    receiver: Receiver, cert: Cert
) -> None:
    response = await post_to_receiver(receiver, cert, answers=[["127.0.0.2", LOOPBACK]])
    assert response.status_code == 200
    assert len(receiver.arrivals) == 1


async def test_redirects_are_not_followed(receiver: Receiver, cert: Cert) -> None:
    receiver.script("/hook", [Answer(302, location="https://receiver.test/elsewhere", body=b"")])
    response = await post_to_receiver(receiver, cert)
    assert response.status_code == 302
    assert len(receiver.arrivals) == 1


async def test_proxy_variables_are_ignored(
    receiver: Receiver, cert: Cert, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = f"http://{LOOPBACK}:{listener.port}"
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    response = await post_to_receiver(receiver, cert)

    assert response.status_code == 200
    assert listener.connections == 0
    assert len(receiver.arrivals) == 1


async def test_a_large_answer_is_cut(receiver: Receiver, cert: Cert) -> None:
    size = outbound.MAX_RESPONSE_BYTES * 3
    receiver.script("/hook", [Answer(body=b"x" * size)])
    response = await post_to_receiver(receiver, cert)
    assert response.status_code == 200
    assert response.content == b"x" * outbound.MAX_RESPONSE_BYTES


async def test_a_receiver_that_never_answers_times_out(receiver: Receiver, cert: Cert) -> None:
    receiver.script("/hook", [Answer(delay=60)])  # until the receiver closes
    with pytest.raises(httpx.TimeoutException):
        await post_to_receiver(receiver, cert, seconds=0.5)
    assert len(receiver.arrivals) == 1


async def test_the_pinned_transport_refuses_a_host_it_has_no_addresses_for(
    receiver: Receiver, cert: Cert
) -> None:
    transport = outbound.PinnedTransport(
        {"receiver.test": [ipaddress.ip_address(LOOPBACK)]}, ca_bundle=cert.cert
    )
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
        ok = await client.get(f"https://receiver.test:{receiver.port}/")
        assert ok.status_code == 200
        with pytest.raises(ForbiddenAddress, match=re.escape("not checked: other.test")):
            await client.get(f"https://other.test:{receiver.port}/")
    assert receiver.connections == 1


# --- GuardedClient: connections kept, every request still checked ------------


async def test_a_guarded_client_checks_every_request_and_reuses_one_connection(
    receiver: Receiver, cert: Cert
) -> None:
    receiver.keep_alive = True
    resolver = ScriptedResolver([[LOOPBACK]])
    client = outbound.GuardedClient(resolver=resolver, allowed_hosts=RECEIVER, ca_bundle=cert.cert)
    try:
        for n in range(3):
            response = await client.post(
                f"https://receiver.test:{receiver.port}/hook?n={n}",
                content=b"{}",
                headers={"webhook-id": f"d_{n}"},
                timeout=5,
            )
            assert (response.status_code, response.content) == (200, b"ok")
    finally:
        await client.aclose()

    assert resolver.lookups == ["receiver.test"] * 3  # one lookup per request
    assert receiver.connections == 1  # one TLS handshake for all three
    assert [a.target for a in receiver.arrivals] == ["/hook?n=0", "/hook?n=1", "/hook?n=2"]
    assert receiver.server_names == ["receiver.test"]


async def test_a_guarded_client_refuses_a_host_that_now_resolves_to_loopback(
    listener: Listener,
) -> None:
    # The first answer is public (recorded, not contacted); the second, loopback, is
    # refused before any connection, however the first request's transport is kept.
    resolver = ScriptedResolver([["93.184.216.34"], [LOOPBACK]])
    backend = LoopbackOnlyBackend()
    client = outbound.GuardedClient(resolver=resolver, network_backend=backend)
    url = f"https://rebind.test:{listener.port}/hook"
    try:
        with pytest.raises(httpx.ConnectError, match="recorded, not contacted"):
            await client.post(url, content=b"{}", headers={}, timeout=5)
        with pytest.raises(ForbiddenAddress, match="resolves to a loopback address"):
            await client.post(url, content=b"{}", headers={}, timeout=5)
    finally:
        await client.aclose()
    assert resolver.lookups == ["rebind.test", "rebind.test"]
    assert backend.connects == [("93.184.216.34", listener.port)]
    assert listener.connections == 0


async def test_a_guarded_client_keeps_one_transport_per_answer_and_a_bounded_number(
    listener: Listener,
) -> None:
    # A new answer for a host replaces its transport; past max_hosts the oldest goes.
    resolver = ScriptedResolver(
        [["93.184.216.34"], ["93.184.216.35"], ["93.184.216.36"], ["93.184.216.37"]]
    )
    backend = LoopbackOnlyBackend()
    client = outbound.GuardedClient(resolver=resolver, network_backend=backend, max_hosts=2)
    try:
        for host in ("a.test", "a.test", "b.test", "c.test"):
            with pytest.raises(httpx.ConnectError):
                await client.post(
                    f"https://{host}:{listener.port}/", content=b"", headers={}, timeout=5
                )
            assert len(client) <= 2
        assert len(client) == 2
    finally:
        await client.aclose()
    assert len(client) == 0
    assert [address for address, _ in backend.connects] == [
        "93.184.216.34",
        "93.184.216.35",
        "93.184.216.36",
        "93.184.216.37",
    ]


async def test_a_checked_answer_serves_a_hosts_requests_for_answer_seconds(
    receiver: Receiver, cert: Cert
) -> None:
    receiver.keep_alive = True
    resolver = ScriptedResolver([[LOOPBACK]])
    client = outbound.GuardedClient(
        resolver=resolver, allowed_hosts=RECEIVER, ca_bundle=cert.cert, answer_seconds=0.5
    )
    url = f"https://receiver.test:{receiver.port}/hook"
    try:
        for _ in range(3):
            response = await client.post(url, content=b"{}", headers={}, timeout=5)
            assert response.status_code == 200
        assert resolver.lookups == ["receiver.test"]  # one lookup for the three
        await asyncio.sleep(0.6)
        await client.post(url, content=b"{}", headers={}, timeout=5)
    finally:
        await client.aclose()
    assert resolver.lookups == ["receiver.test"] * 2  # the answer expired: looked up again
    assert receiver.connections == 1


async def test_a_refused_answer_is_never_kept_and_a_failed_connection_forgets_its_host(
    listener: Listener,
) -> None:
    # Loopback (refused), then a public answer whose connection fails, then loopback again:
    # each request looks the host up, however long answers may be kept.
    resolver = ScriptedResolver([[LOOPBACK], ["93.184.216.34"], [LOOPBACK]])
    backend = LoopbackOnlyBackend()
    client = outbound.GuardedClient(resolver=resolver, network_backend=backend, answer_seconds=60)
    url = f"https://rebind.test:{listener.port}/hook"
    try:
        with pytest.raises(ForbiddenAddress, match="resolves to a loopback address"):
            await client.post(url, content=b"{}", headers={}, timeout=5)
        with pytest.raises(httpx.ConnectError, match="recorded, not contacted"):
            await client.post(url, content=b"{}", headers={}, timeout=5)
        with pytest.raises(ForbiddenAddress, match="resolves to a loopback address"):
            await client.post(url, content=b"{}", headers={}, timeout=5)
    finally:
        await client.aclose()
    assert resolver.lookups == ["rebind.test"] * 3
    assert backend.connects == [("93.184.216.34", listener.port)]
    assert listener.connections == 0


async def test_an_idle_connection_the_server_closed_is_seen_as_readable() -> None:
    # The pool asks every idle connection "readable?" (the server closed it): then it
    # opens a new one rather than send on a dead one.
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer)

    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port)
        writer = await asyncio.wait_for(accepted.get(), 5)
        assert stream.get_extra_info("is_readable") is False
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(10, timeout=0.05)
        writer.close()
        for _ in range(100):
            if stream.get_extra_info("is_readable"):
                break
            await asyncio.sleep(0.01)
        assert stream.get_extra_info("is_readable") is True
        assert await stream.read(10) == b""
        await stream.aclose()
    finally:
        server.close()


async def test_the_default_sockets_fail_as_httpcore_errors() -> None:
    with pytest.raises(httpcore.ConnectError):
        await AsyncioBackend().connect_tcp("127.0.0.1", 1)  # nothing listens there


async def test_the_pool_caps_its_connections_and_keeps_the_keep_alive_limit() -> None:
    # A keep-alive HTTP server that counts the connections open at once and answers after
    # a pause, so that requests overlap. Our pool (``gateway/outbound/h1.py``) replaces
    # httpcore's.
    opened = open_now = most = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened, open_now, most
        opened, open_now = opened + 1, open_now + 1
        most = max(most, open_now)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.readuntil(b"\r\n\r\n"):
                await asyncio.sleep(0.02)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        open_now -= 1
        writer.close()

    server = await asyncio.start_server(serve, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    transport = outbound.StreamsTransport(max_connections=4, max_keepalive_connections=4)
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            answers = await asyncio.gather(
                *(client.get(f"http://{LOOPBACK}:{port}/{i}") for i in range(40))
            )
            assert [a.text for a in answers] == ["ok"] * 40
            # 40 overlapping requests on 4 connections kept alive: never more, none new.
            assert (most, opened) == (4, 4)
            assert len(transport._pool) == 4
        # A pool that keeps fewer alive than it may open closes the idle surplus.
        transport = outbound.StreamsTransport(max_connections=4, max_keepalive_connections=1)
        async with httpx.AsyncClient(transport=transport) as client:
            await asyncio.gather(*(client.get(f"http://{LOOPBACK}:{port}/{i}") for i in range(8)))
            assert most == 4
            await client.get(f"http://{LOOPBACK}:{port}/last")
            assert len(transport._pool) == 1
    finally:
        server.close()
        await server.wait_closed()
