"""The one real HTTPS receiver on loopback, and the test resolver that points at it.

Callbacks, result-image downloads and the outbound guard's own tests all send
to it. The receiver listens on 127.0.0.1 with a self-signed certificate for
``receiver.test`` (made with the openssl CLI); Tollgate is trusted with it
through ``outbound_ca_bundle`` and finds the host through ``FakeResolver``,
which answers from its table and never asks the system, so no lookup or
connection leaves the machine. Each path answers from its own script (fail the
first K requests, redirect, answer slowly, a large body), so concurrent senders
can share one receiver; every request is recorded as it arrived, with the TLS
server name the client sent. The ``cert`` and ``receiver`` fixtures
(``tests/conftest.py``) build them.
"""

import asyncio
import contextlib
import ipaddress
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpcore

from gateway.outbound import IPAddress

LOOPBACK = "127.0.0.1"
HOST = "receiver.test"

_REASONS = {200: "OK", 204: "No Content", 302: "Found", 500: "Internal Server Error"}


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def make_cert(folder: Path) -> Cert:
    """A self-signed certificate for receiver.test only."""
    made = Cert(folder / "cert.pem", folder / "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(made.key), "-out", str(made.cert), "-days", "2",
            "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=DNS:{HOST}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return made


@dataclass(frozen=True)
class Answer:
    """How the receiver answers one request: a status, maybe late, maybe a redirect."""

    status: int = 200
    delay: float = 0.0  # seconds before answering
    location: str | None = None
    body: bytes = b"ok"


OK = Answer()


def failing(times: int, status: int = 500) -> list[Answer]:
    """Fail the first ``times`` requests with ``status``, then answer 200."""
    return [Answer(status)] * times + [OK]


@dataclass
class Arrival:
    at: float  # time.monotonic() once the whole request was read
    method: str
    target: str  # the request target as sent: path and query
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


class Receiver:
    """An HTTPS server on 127.0.0.1 that records every request and answers by script.

    ``script(path, answers)``: the n-th request to ``path`` gets ``answers[n]``
    (the last one again after that); an unscripted path answers 200.
    ``on_arrival`` runs for each request before it is answered. ``connections``
    counts TCP connections before TLS, so a refused handshake still counts;
    ``server_names`` lists the TLS server name (SNI) of each handshake.
    ``keep_alive``: serve further requests on a connection (default: close it after one).
    """

    def __init__(self, cert: Cert) -> None:
        self.cert = cert
        self.connections = 0
        self.keep_alive = False
        self.server_names: list[str | None] = []
        self.arrivals: list[Arrival] = []
        self.on_arrival: Callable[[Arrival], Awaitable[None]] | None = None
        self.port = 0
        self._scripts: dict[str, list[Answer]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Condition()

    async def start(self) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(self.cert.cert, self.cert.key)
        self._context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, path: str, host: str = HOST) -> str:
        return f"https://{host}:{self.port}{path}"

    def script(self, path: str, answers: Iterable[Answer]) -> str:
        """Answer requests to ``path`` with ``answers``; returns the URL of ``path``."""
        self._scripts[path] = list(answers)
        return self.url(path)

    def at(self, path: str) -> list[Arrival]:
        return [arrival for arrival in self.arrivals if arrival.path == path]

    async def wait_for(self, path: str, count: int, within: float = 20) -> list[Arrival]:
        """The first ``count`` requests to ``path``, once that many have arrived."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.at(path)) >= count)
        return self.at(path)[:count]

    def _answer_for(self, path: str, number: int) -> Answer:
        answers = self._scripts.get(path) or [OK]
        return answers[min(number, len(answers) - 1)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            async with asyncio.timeout(30):
                await writer.start_tls(self._context)
                while True:  # one request, or with keep_alive as many as the client sends
                    head = await reader.readuntil(b"\r\n\r\n")
                    request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
                    method, target, _ = request_line.split(" ")
                    headers = {}
                    for line in lines:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                    path = target.split("?", 1)[0]
                    number = len(self.at(path))
                    arrival = Arrival(time.monotonic(), method, target, path, headers, body)
                    self.arrivals.append(arrival)
                    async with self._arrived:
                        self._arrived.notify_all()
                    if self.on_arrival is not None:
                        await self.on_arrival(arrival)
                    answer = self._answer_for(path, number)
                    if answer.delay:
                        await asyncio.sleep(answer.delay)
                    location = f"Location: {answer.location}\r\n" if answer.location else ""
                    reason = _REASONS.get(answer.status, "Status")
                    closing = "" if self.keep_alive else "Connection: close\r\n"
                    writer.write(
                        f"HTTP/1.1 {answer.status} {reason}\r\n{location}"
                        f"Content-Length: {len(answer.body)}\r\n{closing}\r\n".encode()
                        + answer.body
                    )
                    await writer.drain()
                    if not self.keep_alive:
                        break
        except (OSError, asyncio.IncompleteReadError, TimeoutError, asyncio.LimitOverrunError):
            pass  # a handshake the client refused, or a client that gave up (a timeout)
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            self._handlers.discard(task)


class FakeResolver:
    """Answers lookups from ``answers`` (host -> successive answers, the last repeating).

    A host not in the table does not resolve (``OSError``): the system resolver
    is never asked. ``lookups`` lists every host looked up, in order.
    """

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self._answers = {host.lower(): list(seq) for host, seq in answers.items()}
        self.lookups: list[str] = []

    def count(self, host: str) -> int:
        return self.lookups.count(host.lower())

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        key = host.lower().removesuffix(".")
        self.lookups.append(key)
        sequence = self._answers.get(key)
        if not sequence:
            raise OSError(f"{host} is not in the test resolver")
        answer = sequence[min(self.count(key), len(sequence)) - 1]
        return [ipaddress.ip_address(address) for address in answer]


class LoopbackOnlyBackend(httpcore.AsyncNetworkBackend):
    """Opens real connections to loopback only; any other address is recorded, not contacted.

    ``connects`` lists every connection asked for; ``elsewhere`` those not to loopback.
    """

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()
        self.connects: list[tuple[str, int]] = []
        self.elsewhere: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        if not ipaddress.ip_address(host).is_loopback:
            self.elsewhere.append((host, port))
            raise httpcore.ConnectError(f"{host} recorded, not contacted (tests stay on loopback)")
        return await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
