"""``/readyz``: 200 when PostgreSQL, Redis and the result store answer and the schema is at
head; else 503 naming what failed, quickly. ``/healthz`` stays 200 throughout (the process
is alive).

Redis "going away" is a real TCP proxy in front of the test Redis that the test shuts,
connections and all; the database cases are a database without migrations and a port
nothing listens on.
"""

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from conftest import REDIS_URL, SERVER_URL, _plain, free_port
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import make_url

from gateway.app import create_app
from gateway.settings import Settings

Client = AsyncTestClient[Any]


class Proxy:
    """Forwards TCP connections to ``target``; ``close`` refuses new ones and cuts the rest.

    It runs its own event loop in a thread: the test client blocks the test's loop
    while the app answers.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._pipes: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._closed = False

    def start(self) -> int:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        ).result()
        self._server = server
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for task in (
            asyncio.create_task(pipe(reader, upstream_writer)),
            asyncio.create_task(pipe(upstream_reader, writer)),
        ):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _close(self) -> None:
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def ready(client: Client) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = await client.get("/readyz")
    return response.status_code, response.json(), time.monotonic() - started


async def test_ready_when_everything_answers(client: Client) -> None:
    status, body, _ = await ready(client)
    assert (status, body) == (200, {"status": "ready"})


async def test_not_ready_when_redis_goes_away(settings: Settings) -> None:
    target = urlsplit(REDIS_URL)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 6379)
    port = proxy.start()
    proxied = settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{port}{target.path or '/0'}"}
    )
    try:
        async with AsyncTestClient(app=create_app(proxied)) as client:
            assert (await ready(client))[:2] == (200, {"status": "ready"})
            proxy.close()
            status, body, took = await ready(client)
            assert status == 503
            assert body["status"] == "not ready"
            assert body["checks"]["redis"] in ("unreachable", "timeout")
            assert body["checks"]["postgresql"] == "ok"
            assert body["checks"]["migrations"] == "ok"
            assert took < 3
            assert (await client.get("/healthz")).status_code == 200
    finally:
        proxy.close()


@contextlib.asynccontextmanager
async def empty_database() -> AsyncIterator[str]:
    name = f"tollgate_unmigrated_{os.getpid()}_{time.monotonic_ns()}"
    server = _plain(SERVER_URL)
    conn = await asyncpg.connect(server)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = make_url(SERVER_URL).set(drivername="postgresql+asyncpg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(server)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def test_not_ready_on_a_database_without_migrations(settings: Settings) -> None:
    async with empty_database() as url:
        unmigrated = settings.model_copy(update={"database_url": url})
        app = create_app(unmigrated, check_schema=False)
        async with AsyncTestClient(app=app) as client:
            status, body, _ = await ready(client)
    assert status == 503
    assert body["checks"]["postgresql"] == "ok"
    assert body["checks"]["redis"] == "ok"
    assert body["checks"]["migrations"].startswith("at no revision, needs ")


async def test_not_ready_when_postgresql_is_unreachable(settings: Settings) -> None:
    nowhere = make_url(settings.database_url).set(host="127.0.0.1", port=free_port())
    unreachable = settings.model_copy(
        update={"database_url": nowhere.render_as_string(hide_password=False)}
    )
    async with AsyncTestClient(app=create_app(unreachable, check_schema=False)) as client:
        status, body, took = await ready(client)
        assert (await client.get("/healthz")).status_code == 200
    assert status == 503
    assert body["checks"] == {"postgresql": "unreachable", "redis": "ok", "storage": "ok"}
    assert took < 3
