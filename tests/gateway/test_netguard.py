"""The SSRF guard: internal IPs in every spelling, one lookup, pinned connections, TLS by name.

Every network test talks to listeners this file starts on 127.0.0.1 (a real
HTTPS receiver with a self-signed certificate for ``receiver.test``, made with
the openssl CLI). Public addresses are only classified, never contacted: where
a test needs the guard to "connect" to one, a recording network backend takes
the connection and opens nothing.
"""

import asyncio
import contextlib
import ipaddress
import re
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpcore
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import netguard
from gateway.callback_urls import validate_callback_url
from gateway.errors import InvalidRequest
from gateway.netguard import ForbiddenAddress, IPAddress

LOOPBACK = "127.0.0.1"


def teredo(server: str, client: str) -> str:
    """A Teredo address: 2001:0::/32, server in bits 32..63, client inverted in the last 32."""
    bits = (
        (0x2001_0000 << 96)
        | (int(ipaddress.IPv4Address(server)) << 64)
        | (0x8000_63BF << 32)  # flags and the obfuscated port: any value
        | (~int(ipaddress.IPv4Address(client)) & 0xFFFF_FFFF)
    )
    return str(ipaddress.IPv6Address(bits))


TEREDO_LOOPBACK_CLIENT = teredo("65.54.227.120", "127.0.0.1")

# (URL, words the refusal must contain). The host of every one but the last three is an IP.
REFUSED = [
    ("https://127.0.0.1/", "loopback"),
    ("https://2130706433/", "loopback"),
    ("https://0x7f.1/", "loopback"),
    ("https://017700000001/", "loopback"),
    ("https://127.1/", "loopback"),
    ("https://[::1]/", "loopback"),
    ("https://[::ffff:127.0.0.1]/", "loopback address in IPv4-mapped form"),
    ("https://[::ffff:7f00:1]/", "loopback address in IPv4-mapped form"),
    ("https://169.254.169.254/", "link-local (cloud metadata)"),
    ("https://10.0.0.1/", "private"),
    ("https://100.64.0.1/", "shared"),
    ("https://[64:ff9b::7f00:1]/", "loopback address in NAT64 form"),
    ("https://[2002:7f00:1::]/", "loopback address in 6to4 form"),
    (f"https://[{TEREDO_LOOPBACK_CLIENT}]/", "loopback address in Teredo form"),
    ("https://[fe80::1]/", "link-local"),
    ("https://[fc00::1]/", "private"),
    ("https://0.0.0.0/", "unspecified"),
    ("https://224.0.0.1/", "multicast"),
    ("https://240.0.0.1/", "reserved"),
    ("http://example.com/", "must be an https:// URL"),
    ("https://example.com/" + "a" * 2029, "must be at most 2048 characters"),
    ("https://user:pw@example.com/", "must not contain a user name or password"),
]
LITERAL_REFUSED = REFUSED[:-3]
assert len(REFUSED[-2][0]) == 2049


@dataclass
class ScriptedResolver:
    """Answers the n-th lookup with ``answers[n]`` (the last one again after that)."""

    answers: list[list[str]] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        self.lookups.append(host)
        assert self.answers, f"no lookup expected, got one for {host}"
        answer = self.answers[min(len(self.lookups), len(self.answers)) - 1]
        return [ipaddress.ip_address(address) for address in answer]


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Takes connections without making them: the guard may aim at public addresses."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        raise httpcore.ConnectError("recorded, not connected")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# --- Literal IPs -----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
        ("1.16777215", "1.255.255.255"),
        ("127.0.0.1.", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ],
)
def test_literal_ip_is_read_in_every_spelling(host: str, expected: str) -> None:
    assert netguard.parse_literal_ip(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "host",
    ["example.com", "receiver.test", "1.2.3.4.5", "256.1.1.1", "1.16777216", "4294967296", "08"],
)
def test_a_name_is_not_an_ip(host: str) -> None:
    assert netguard.parse_literal_ip(host) is None


@pytest.mark.parametrize("host", ["[fe80::1%25eth0]", "fe80::1%eth0", "[zz]", "[::1"])
def test_zone_ids_and_broken_ipv6_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        netguard.parse_literal_ip(host)


def inet_aton(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def agrees_with_inet_aton(text: str) -> None:
    # inet_aton refuses a trailing dot that we accept as the DNS root; everything else agrees.
    if not text.endswith("."):
        assert netguard.parse_literal_ip(text) == inet_aton(text), text


@pytest.mark.parametrize(
    "text",
    [
        "0x", "0x.1", "1.", "1..2", "00", "08", "09", "0x100000000", "4294967296",
        "1.16777216", "256.1", "1.2.65536", "0xg", "1.2.3.4.5", "", ".", "0x0x1",
        "00000000000000000000000001", "0x00000000000000000000001", "1e2", "0.0.0.0x",
        "0xffffffff", "0x1ffffffff", "255.255.255.255", "255.255.255.256",
    ],
)  # fmt: skip
def test_ipv4_parser_agrees_with_inet_aton_on_edges(text: str) -> None:
    agrees_with_inet_aton(text)


def ipv4_part() -> st.SearchStrategy[str]:
    number = st.integers(min_value=0, max_value=2**33)
    return st.one_of(
        number.map(str),
        number.map(lambda n: f"0{n:o}"),
        number.map(lambda n: f"0x{n:x}"),
        number.map(lambda n: f"0X{n:X}"),
    )


@settings(max_examples=500, deadline=None)
@given(st.lists(ipv4_part(), min_size=1, max_size=5).map(".".join))
def test_ipv4_parser_agrees_with_inet_aton_on_numbers(text: str) -> None:
    agrees_with_inet_aton(text)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789abcdefxX.", max_size=16))
def test_ipv4_parser_agrees_with_inet_aton_on_any_text(text: str) -> None:
    agrees_with_inet_aton(text)


# --- Public or not ---------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "8.8.8.8",
        "2606:2800:220:1:248:1893:25c8:1946",
        "::ffff:93.184.216.34",
        "64:ff9b::808:808",
        "2002:808:808::1",
        teredo("65.54.227.120", "93.184.216.34"),
    ],
)
def test_global_unicast_is_public(address: str) -> None:
    assert netguard.is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "127.255.255.254", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
        "169.254.169.254", "100.64.0.1", "100.127.255.255", "0.0.0.0", "0.1.2.3",
        "224.0.0.1", "239.255.255.255", "240.0.0.1", "255.255.255.255", "192.0.0.8",
        "192.0.2.1", "198.18.0.1", "198.19.255.255", "198.51.100.1", "203.0.113.1",
        "::", "::1", "::127.0.0.1", "::8.8.8.8", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "2002:a00:1::", "2002:c0a8:101::1",
        teredo("10.0.0.1", "93.184.216.34"), teredo("65.54.227.120", "192.168.0.1"),
        "2001:db8::1", "3fff::1", "2001:2::1", "100::1", "fc00::1", "fdff::1", "fe80::1",
        "febf::1", "fec0::1", "ff02::1", "4000::1",
    ],
)  # fmt: skip
def test_every_internal_or_reserved_range_is_not_public(address: str) -> None:
    assert not netguard.is_public(ipaddress.ip_address(address))


# --- The refusal table: at submit and at delivery --------------------------


@pytest.mark.parametrize(("url", "words"), REFUSED)
def test_submit_refuses_naming_the_field(url: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        validate_callback_url(url)
    assert refused.value.message.startswith("callback_url: ")
    assert words in refused.value.message
    with pytest.raises(InvalidRequest, match=r"^X-Webhook-URL: "):
        validate_callback_url(url, "X-Webhook-URL")


@pytest.mark.parametrize(("url", "words"), LITERAL_REFUSED)
async def test_delivery_refuses_a_literal_ip_without_a_lookup(url: str, words: str) -> None:
    host = url.removeprefix("https://").removesuffix("/").strip("[]")
    with pytest.raises(ForbiddenAddress, match=re.escape(words)):
        await netguard.resolve_public(host, 443, resolver=ScriptedResolver())


@pytest.mark.parametrize(("url", "words"), REFUSED)
async def test_guarded_post_refuses_before_looking_up_or_connecting(url: str, words: str) -> None:
    backend = RecordingBackend()
    with pytest.raises(ForbiddenAddress, match=re.escape(words)):
        await netguard.guarded_post(
            url,
            content=b"{}",
            headers={},
            timeout=5,
            resolver=ScriptedResolver(),
            network_backend=backend,
        )
    assert backend.connects == []


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://a b/", "must name a valid host"),
        ("https://1.2.3.4.5/", "must name a valid host"),
        ("https://example.123/", "must name a valid host"),
        ("https://bücher.example/", "must name a valid host"),
        ("https://[fe80::1%25eth0]/", "must name a valid host"),
        ("https://134744072/", "four decimal numbers"),
        ("https://example.com:99999/", "is not a valid URL"),
        ("https:///path", "must name a host"),
    ],
)
def test_submit_refuses_a_malformed_host(url: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=r"^callback_url: .*" + re.escape(words)):
        validate_callback_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hook",
        "https://hooks.example.com:8443/a?b=c",
        "https://93.184.216.34/hook",
        "https://[2606:2800:220:1:248:1893:25c8:1946]/hook",
        "https://internal_name.example./hook",
    ],
)
def test_submit_accepts_a_public_url(url: str) -> None:
    assert validate_callback_url(url) == url


def test_an_allowed_host_may_be_internal_at_submit() -> None:
    url = "https://127.0.0.1:8443/hook"
    assert validate_callback_url(url, allowed_hosts=frozenset({"127.0.0.1"})) == url


# --- Resolving once --------------------------------------------------------


async def test_a_name_that_resolves_to_loopback_is_refused_without_naming_the_address() -> None:
    resolver = ScriptedResolver([["127.0.0.1"]])
    with pytest.raises(ForbiddenAddress) as refused:
        await netguard.resolve_public("evil.test", 443, resolver=resolver)
    assert str(refused.value) == (
        "must not point at an internal address: evil.test resolves to a loopback address"
    )
    assert resolver.lookups == ["evil.test"]


async def test_one_internal_address_among_public_ones_is_enough_to_refuse() -> None:
    resolver = ScriptedResolver([["93.184.216.34", "2606:2800:220:1::1", "::ffff:10.0.0.1"]])
    with pytest.raises(ForbiddenAddress, match="private address in IPv4-mapped form"):
        await netguard.resolve_public("mixed.test", 443, resolver=resolver)


async def test_addresses_come_back_once_each_in_the_resolvers_order() -> None:
    resolver = ScriptedResolver([["93.184.216.34", "2606:2800:220:1::1", "93.184.216.34"]])
    addresses = await netguard.resolve_public("example.test", 443, resolver=resolver)
    assert addresses == [
        ipaddress.ip_address("93.184.216.34"),
        ipaddress.ip_address("2606:2800:220:1::1"),
    ]


async def test_an_allowed_host_may_resolve_to_loopback() -> None:
    resolver = ScriptedResolver([[LOOPBACK]])
    addresses = await netguard.resolve_public(
        "Receiver.Test.", 443, resolver=resolver, allowed_hosts=frozenset({"receiver.test"})
    )
    assert addresses == [ipaddress.ip_address(LOOPBACK)]


async def test_the_system_resolver_is_used_by_default() -> None:
    # "localhost" resolves from /etc/hosts: no DNS traffic leaves the machine.
    with pytest.raises(ForbiddenAddress, match="localhost resolves to a loopback address"):
        await netguard.resolve_public("localhost", 443)


# --- A real HTTPS receiver on loopback -------------------------------------


@dataclass
class Received:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTPS server on 127.0.0.1 that records what reaches it and answers ``reply``."""

    cert: Path
    key: Path
    reply: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    hang: bool = False
    connections: int = 0
    server_names: list[str | None] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    async def start(self) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(self.cert, self.key)
        self._context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
        self._closing = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._closing.set()
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Counted before TLS, so a refused handshake still shows up as a connection.
        self.connections += 1
        try:
            async with asyncio.timeout(10):
                await writer.start_tls(self._context)
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
                method, target, _ = request_line.split(" ")
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Received(method, target, headers, body))
                if self.hang:
                    await self._closing.wait()
                    return
                writer.write(self.reply)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # a handshake the client refused, or a client that gave up
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


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


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    """A self-signed certificate for receiver.test only."""
    folder = tmp_path_factory.mktemp("receiver-cert")
    made = Cert(folder / "cert.pem", folder / "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(made.key), "-out", str(made.cert), "-days", "2",
            "-subj", "/CN=receiver.test", "-addext", "subjectAltName=DNS:receiver.test",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return made


@pytest.fixture
async def receiver(cert: Cert) -> AsyncIterator[Receiver]:
    server = Receiver(cert.cert, cert.key)
    await server.start()
    yield server
    await server.close()


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
    return await netguard.guarded_post(
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
    [request] = receiver.requests
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
    assert receiver.requests == []


async def test_tls_fails_without_the_ca_bundle(receiver: Receiver, cert: Cert) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await post_to_receiver(receiver, cert, trust_cert=False)
    assert receiver.requests == []


async def test_rebinding_cannot_redirect_the_connection(listener: Listener) -> None:
    # First lookup public, a second would say loopback: the guard looks up once
    # and aims only at what it checked. The public address is not contacted: the
    # recording backend takes the connection.
    resolver = ScriptedResolver([["93.184.216.34"], [LOOPBACK]])
    backend = RecordingBackend()
    with pytest.raises(httpx.ConnectError, match="recorded, not connected"):
        await netguard.guarded_post(
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
        await netguard.guarded_post(
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
    assert len(receiver.requests) == 1


async def test_the_next_checked_address_is_tried_when_one_refuses(
    receiver: Receiver, cert: Cert
) -> None:
    response = await post_to_receiver(receiver, cert, answers=[["127.0.0.2", LOOPBACK]])
    assert response.status_code == 200
    assert len(receiver.requests) == 1


async def test_redirects_are_not_followed(receiver: Receiver, cert: Cert) -> None:
    receiver.reply = (
        b"HTTP/1.1 302 Found\r\nLocation: https://receiver.test/elsewhere\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    response = await post_to_receiver(receiver, cert)
    assert response.status_code == 302
    assert len(receiver.requests) == 1


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
    assert len(receiver.requests) == 1


async def test_a_large_answer_is_cut(receiver: Receiver, cert: Cert) -> None:
    size = netguard.MAX_RESPONSE_BYTES * 3
    receiver.reply = (
        f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode()
        + b"x" * size
    )
    response = await post_to_receiver(receiver, cert)
    assert response.status_code == 200
    assert response.content == b"x" * netguard.MAX_RESPONSE_BYTES


async def test_a_receiver_that_never_answers_times_out(receiver: Receiver, cert: Cert) -> None:
    receiver.hang = True
    with pytest.raises(httpx.TimeoutException):
        await post_to_receiver(receiver, cert, seconds=0.5)
    assert len(receiver.requests) == 1


async def test_the_pinned_transport_refuses_a_host_it_has_no_addresses_for(
    receiver: Receiver, cert: Cert
) -> None:
    transport = netguard.PinnedTransport(
        {"receiver.test": [ipaddress.ip_address(LOOPBACK)]}, ca_bundle=cert.cert
    )
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
        ok = await client.get(f"https://receiver.test:{receiver.port}/")
        assert ok.status_code == 200
        with pytest.raises(ForbiddenAddress, match=re.escape("not checked: other.test")):
            await client.get(f"https://other.test:{receiver.port}/")
    assert receiver.connections == 1
