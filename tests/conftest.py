"""Shared fixtures: real PostgreSQL, real Redis, a real simulator process.

Servers come from ``TOLLGATE_TEST_DATABASE_URL`` (any database on the server;
the run creates its own) and ``TOLLGATE_TEST_REDIS_URL``; ``scripts/dev.py
test`` sets both, and without them the local standard ports are used. Each run
builds a fresh database with ``alembic upgrade head``, so every run exercises
the migrations. Tests isolate themselves by creating their own tenants and
using their own queue name; Redis is never flushed under another run.
"""

import asyncio
import contextlib
import gc
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from https_receiver import Cert, Receiver, make_cert
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.app import create_app
from gateway.db import create_engine, session_factory, transaction
from gateway.ledger import service as ledger
from gateway.ledger.models import EntryKind
from gateway.settings import Settings, UpstreamAccount
from gateway.storage import LocalStorage, Storage
from gateway.tenants.service import create_tenant, issue_key
from pricing.catalog import load_catalog
from workers.deps import WorkerDeps
from workers.routing import Directory
from workers.simulator.app import SimulatorConfig, create_simulator_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Collect garbage as each test module ends, and fail its last test on what it leaked.

    An object left open in a reference cycle (a socket, a stream, a transport) warns when
    the collector frees it, and the warning is an error in this suite. Left to the
    collector's own timing, it fails whichever later test the collector happens to run in
    (CI once failed the S3 test's set-up on a socket an earlier module had left); collected
    here, the error names the module that leaked it."""
    yield
    if nextitem is not None and nextitem.path == item.path:
        return
    leaked: list[str] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda found: leaked.append(f"{found.object!r}: {found.exc_value!r}")
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous
    if leaked:
        raise AssertionError(f"{item.path.name} left garbage that warns:\n" + "\n".join(leaked))


SERVER_URL = os.environ.get(
    "TOLLGATE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TOLLGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SIM_KEY = "sim-test-key"
ADMIN_TOKEN = "test-admin-token-0123456789"
# The suite's key for secrets at rest (32 bytes, URL-safe base64; gateway/crypto.py).
ENCRYPTION_KEYS = "test:dG9sbGdhdGUtdGVzdC1lbmNyeXB0aW9uLWtleS0zMmI"


def _plain(url: str) -> str:
    """A URL asyncpg understands (no +asyncpg driver suffix)."""
    return str(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"tollgate_test_{os.getpid()}_{secrets.token_hex(3)}"
    server = _plain(SERVER_URL)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = make_url(SERVER_URL).set(drivername="postgresql+asyncpg", database=name)
    rendered = url.render_as_string(hide_password=False)
    env = {**os.environ, "TOLLGATE_DATABASE_URL": rendered}
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    yield rendered
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session", autouse=True)
def ledger_checked_after_the_suite(database_url: str) -> Iterator[None]:
    """After every test has run, the whole ledger must still add up."""
    yield

    async def check() -> list[str]:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                return await ledger.check(conn)
        finally:
            await engine.dispose()

    problems = asyncio.run(check())
    assert not problems, "ledger check failed after the suite:\n" + "\n".join(problems)


@contextlib.contextmanager
def simulator_process(*extra: str) -> Iterator[str]:
    """An upstream simulator as its own process, speaking every protocol over HTTP: its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers.simulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-key",
            SIM_KEY,
            "--latency",
            "0.2",
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_sim/stats", proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    """A self-signed certificate for receiver.test only."""
    return make_cert(tmp_path_factory.mktemp("receiver-cert"))


@pytest.fixture
async def receiver(cert: Cert) -> AsyncIterator[Receiver]:
    """The real HTTPS receiver on loopback (``https_receiver.py``), serving receiver.test."""
    server = Receiver(cert)
    await server.start()
    yield server
    await server.close()


# An in-process simulator (no port, no process) for tests of its protocols and of the adapters.
INPROCESS_SIM_KEY = "sk-adapter-test-5f0c1e9a"
INPROCESS_SIM_BASE = "http://sim.test"


@pytest.fixture
async def sim_client() -> AsyncIterator[httpx.AsyncClient]:
    """A client of an in-process simulator; it serves one request at a time."""
    app = create_simulator_app(SimulatorConfig(api_key=INPROCESS_SIM_KEY, latency=0.0))
    async with AsyncTestClient(app, base_url=INPROCESS_SIM_BASE) as http:
        yield http


@pytest.fixture
async def sim_http() -> AsyncIterator[httpx.AsyncClient]:
    """Like ``sim_client``, but requests run concurrently; every request, image downloads
    included, goes to the one in-process simulator."""
    app = create_simulator_app(SimulatorConfig(api_key=INPROCESS_SIM_KEY, latency=0.0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=INPROCESS_SIM_BASE) as http:
        yield http


@pytest.fixture(scope="session")
def simulator_url() -> Iterator[str]:
    with simulator_process() as url:
        yield url


@pytest.fixture
async def simulator(simulator_url: str) -> AsyncIterator["Sim"]:
    sim = Sim(simulator_url)
    await sim.reset()
    yield sim
    await sim.reset()


class Sim:
    """Drives the simulator's test knobs over HTTP."""

    DEFAULTS: dict[str, Any] = {
        "latency": 0.2,
        "failure_rate": 0.0,
        "error_kind": "none",
        "fail_first_n": 0,
        "retry_after": 1,
    }

    def __init__(self, url: str) -> None:
        self.url = url

    async def configure(self, **knobs: Any) -> None:
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{self.url}/_sim/config", json=knobs)
            response.raise_for_status()

    async def reset(self) -> None:
        async with httpx.AsyncClient() as client:
            (await client.post(f"{self.url}/_sim/reset")).raise_for_status()
        await self.configure(**self.DEFAULTS)

    def configure_now(self, **knobs: Any) -> None:
        """``configure`` for synchronous tests."""
        httpx.post(f"{self.url}/_sim/config", json=knobs).raise_for_status()

    def stats_now(self) -> dict[str, int]:
        """``stats`` for synchronous tests."""
        response = httpx.get(f"{self.url}/_sim/stats")
        response.raise_for_status()
        stats: dict[str, int] = response.json()
        return stats

    async def stats(self) -> dict[str, int]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{self.url}/_sim/stats")
            response.raise_for_status()
            stats: dict[str, int] = response.json()
            return stats


def make_settings(
    database_url: str, simulator_url: str, storage: Path, **overrides: Any
) -> Settings:
    account = UpstreamAccount(base_url=simulator_url, api_key=SIM_KEY)  # type: ignore[arg-type]
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "admin_token": ADMIN_TOKEN,
        "signing_secret": "test-signing-secret-0123456789",
        "encryption_keys": ENCRYPTION_KEYS,
        "public_base_url": "http://testserver.local",
        "storage_dir": storage,
        "queue_name": f"tollgate:test:{uuid.uuid4().hex}",
        "upstreams": {
            "krea": account,
            "siliconflow": account,
            # The simulator serves these protocols under their own path prefixes.
            "openai": UpstreamAccount(base_url=f"{simulator_url}/openai", api_key=SIM_KEY),  # type: ignore[arg-type]
            "bfl": UpstreamAccount(base_url=f"{simulator_url}/bfl", api_key=SIM_KEY),  # type: ignore[arg-type]
        },
        "poll_interval_seconds": 0.1,
        "lease_seconds": 3.0,
        "reconcile_interval_seconds": 1,
        "requeue_pending_after_seconds": 5.0,
        "key_cache_ttl_seconds": 1.0,
        # Limits are off unless a test sets them (tests/gateway/test_limits.py).
        "default_key_rate_limit_per_minute": 0,
        "default_tenant_rate_limit_per_minute": 0,
        "default_max_in_flight": 0,
    }
    values.update(overrides)
    return Settings(**values)


def worker_deps(
    settings: Settings,
    engine: AsyncEngine,
    http: httpx.AsyncClient,
    storage: Storage | None = None,
    **extra: Any,
) -> WorkerDeps:
    """A generation worker's deps built by hand, for tests that drive its jobs directly."""
    catalog = load_catalog()
    return WorkerDeps(
        settings=settings,
        catalog=catalog,
        engine=engine,
        storage=storage if storage is not None else LocalStorage(settings.storage_dir),
        http=http,
        directory=Directory(settings, catalog, engine, http),
        **extra,
    )


@pytest.fixture
def settings(database_url: str, simulator_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, simulator_url, tmp_path / "storage")


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(settings), base_url="http://testserver.local") as c:
        yield c


@pytest.fixture
async def tenant_key(settings: Settings) -> tuple[str, str]:
    """A fresh tenant and one of its keys: (tenant id, bearer key)."""
    return await make_tenant_key(settings)


async def make_tenant_key(
    settings: Settings, group: str = "default", credits_micros: int = 1_000_000_000
) -> tuple[str, str]:
    """A tenant with ``credits_micros`` topped up (1000 credits unless told) and one key."""
    engine = create_engine(settings)
    try:
        async with transaction(session_factory(engine)) as session:
            tenant = await create_tenant(
                session, name=f"tenant-{uuid.uuid4().hex[:10]}", user_group=group
            )
            if credits_micros:
                await ledger.credit(
                    session,
                    tenant.id,
                    credits_micros,
                    kind=EntryKind.TOPUP,
                    idempotency_key=f"test-topup:{tenant.id}",
                )
            issued = await issue_key(session, tenant, name="test")
            return tenant.id, issued.secret
    finally:
        await engine.dispose()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine on the test database, for reading what the code under test wrote."""
    built = create_engine(settings)
    yield built
    await built.dispose()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A client of the test Redis; the test's queue is deleted afterwards."""
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.delete(settings.queue_name)
    await client.aclose()


async def commands_of(redis: Redis, action: Awaitable[None]) -> list[str]:
    """The commands ``redis``'s own connections sent while ``action`` (a coroutine) ran;
    any other client's commands (another test's, a worker's) are not counted, nor are
    the commands a script runs inside Redis."""
    watcher = Redis.from_url(REDIS_URL)
    seen: list[tuple[str, str]] = []
    marker = f"end-{uuid.uuid4().hex}"
    async with watcher.monitor() as monitor:
        await action
        await redis.echo(marker)
        while True:
            info = await monitor.next_command()
            if marker in info["command"]:
                break
            if info.get("client_type") == "tcp":
                address = f"{info['client_address']}:{info['client_port']}"
                seen.append((address, info["command"].split()[0].upper()))
    await watcher.aclose()
    own = _addresses_of(redis)
    return [command for address, command in seen if address in own]


def _addresses_of(redis: Redis) -> set[str]:
    """The local ``host:port`` of each connection open in ``redis``'s pool."""
    pool = redis.connection_pool
    connections = [*pool._available_connections, *pool._in_use_connections]
    addresses = set()
    for connection in connections:
        writer = getattr(connection, "_writer", None)
        if writer is not None:
            host, port = writer.get_extra_info("sockname")[:2]
            addresses.add(f"{host}:{port}")
    return addresses


async def totals(engine: AsyncEngine, tenant_id: str) -> tuple[int, int]:
    """(balance_micros, held_micros) as the database has them."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT balance_micros, held_micros FROM tenants WHERE id = :id"),
                {"id": tenant_id},
            )
        ).one()
    return int(row[0]), int(row[1])


def assert_error(response: Any, status: int, code: str, mentions: str = "") -> dict[str, str]:
    """The response is the error envelope with this status and code, and no traceback;
    its message mentions ``mentions``. Returns the ``error`` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "type"}
    assert body["error"]["code"] == code
    assert mentions in body["error"]["message"]
    assert "Traceback" not in response.text
    return dict(body["error"])


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # pytest keeps its own signal handlers.
        yield


@contextlib.asynccontextmanager
async def serve_app(settings: Settings, app: Any = None) -> AsyncIterator[str]:
    """The app (built from ``settings`` unless given) under uvicorn on a free loopback
    port, in this event loop: its base URL.

    For tests that need real concurrency (the test client runs one request at a time).
    """
    port = free_port()
    config = uvicorn.Config(
        app if app is not None else create_app(settings),
        host="127.0.0.1",
        port=port,
        lifespan="on",
        ws="none",
        log_config=None,
        log_level="warning",
        access_log=False,
    )
    server = _Server(config)
    running = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, trust_env=False) as probe:
            for _ in range(200):
                if running.done():
                    running.result()
                    raise RuntimeError("uvicorn stopped before /healthz answered")
                with contextlib.suppress(httpx.TransportError):
                    if (await probe.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise TimeoutError("/healthz did not answer")
        yield url
    finally:
        server.should_exit = True
        await running


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a ``tollgate`` process needs to act on the test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(
        TOLLGATE_DATABASE_URL=settings.database_url,
        TOLLGATE_REDIS_URL=settings.redis_url,
        TOLLGATE_ADMIN_TOKEN=settings.admin_token,
        TOLLGATE_SIGNING_SECRET=settings.signing_secret,
        TOLLGATE_ENCRYPTION_KEYS=settings.encryption_keys,
        TOLLGATE_QUEUE_NAME=settings.queue_name,
        **extra,
    )
    return env


async def run_cli(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    """Run ``tollgate ARGS`` as its own process: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        cwd=ROOT,
        env=cli_env(settings, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def rows_of(
    engine: AsyncEngine, tenant_id: str, tables: tuple[str, ...] = ("tasks",)
) -> dict[str, int]:
    """A tenant's ledger rows by kind, and its rows in each of ``tables``."""
    async with engine.connect() as conn:
        found = dict(
            (
                await conn.execute(
                    text(
                        "SELECT kind, COUNT(*) FROM ledger_entries WHERE tenant_id = :t "
                        "GROUP BY kind"
                    ),
                    {"t": tenant_id},
                )
            ).all()
        )
        for table in tables:
            found[table] = (
                await conn.execute(
                    text(f"SELECT COUNT(*) FROM {table} WHERE tenant_id = :t"), {"t": tenant_id}
                )
            ).scalar_one()
    return {k: int(v) for k, v in found.items()}


def start_worker(settings: Settings) -> tuple[Any, "asyncio.Task[None]"]:
    """An arq worker running in this event loop with the given settings."""
    from workers.main import create_worker

    arq_worker = create_worker(settings, handle_signals=False)
    return arq_worker, asyncio.create_task(arq_worker.async_run())


async def stop_worker(arq_worker: Any, running: "asyncio.Task[None]") -> None:
    """Stop picking jobs, let running ones finish (10 s at most), then shut down cleanly."""
    arq_worker.allow_pick_jobs = False
    jobs = list(arq_worker.tasks.values())
    if jobs:
        await asyncio.wait(jobs, timeout=10)
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    arq_worker.tasks.clear()
    await arq_worker.close()
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[None]:
    arq_worker, running = start_worker(settings)
    yield
    await stop_worker(arq_worker, running)


async def wait_for_status(
    client: AsyncTestClient[Any], key: str, task_id: str, statuses: set[str], wait: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await client.get(f"/v1/tasks/{task_id}", headers=bearer(key))
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in statuses:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} stayed {body.get('status')}: {body}")
