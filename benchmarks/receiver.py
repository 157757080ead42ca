"""A real HTTPS callback receiver on loopback for the benchmark: answers 200 and counts.

It runs on its own thread and event loop, so the benchmark's own work never delays an
answer. The certificate is self-signed for ``localhost`` (made with the openssl CLI); the
callback worker trusts it through ``TOLLGATE_CALLBACK_CA_BUNDLE`` and may reach it because
``TOLLGATE_CALLBACK_ALLOWED_HOSTS`` names ``localhost``. Connections are kept alive, as a
real receiver's would be.
"""

import asyncio
import contextlib
import ssl
import subprocess
import threading
import time
from pathlib import Path

HOST = "localhost"


def make_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "receiver-cert.pem", folder / "receiver-key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=DNS:{HOST}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class Receiver:
    def __init__(self, cert: Path, key: Path) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self.arrivals: list[float] = []  # time.monotonic() of each complete request
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the callback receiver did not start")

    def stop(self) -> None:
        if self._thread.is_alive():  # else never started (the run failed before it)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def url(self, path: str = "/callback") -> str:
        return f"https://{HOST}:{self.port}{path}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._context)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                self.arrivals.append(time.monotonic())
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"
                )
                await writer.drain()
        writer.close()
