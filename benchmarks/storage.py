"""Tasks/s of one generation worker with each result store: a directory and an S3 bucket.

    .venv/bin/python benchmarks/storage.py --database-url postgresql://postgres@127.0.0.1/x \\
        --redis-url redis://127.0.0.1:6379/0 [--tasks 400] [--backends file,s3] [--json PATH]

For each backend, in one run: a fresh database (created, migrated, dropped at the end),
queue names of its own in Redis (deleted at the end), the upstream simulator at latency 0,
and for ``s3`` moto's S3 server on a free loopback port (the test suite's server; a real
store adds its network latency to every put). ``--tasks`` tasks of ``flux-1-schnell``
(one 512×512 PNG each) are submitted through the app while no worker runs; then one
``tollgate-worker`` process runs them: tasks/s is completed tasks over the span from the
first job's start to the last task completed with its image stored (the worker's start-up
is not counted). Every stored object is counted in the store afterwards.

Absolute figures depend on the machine and what else runs on it; the ratio between the two
backends, measured a minute apart, is the figure to compare.
"""

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from litestar.testing import AsyncTestClient
from redis import Redis
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
SIM_KEY = "bench-sim-key"
BODY = {"model": "flux-1-schnell", "prompt": "a lighthouse at dawn", "size": "512x512"}
S3_KEY, S3_SECRET = "bench-key", "bench-secret-0123456789"


def say(message: str) -> None:
    print(f"bench-storage: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plain(url: str) -> str:
    return str(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1, trust_env=False).status_code < 500:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def database(server_url: str) -> Iterator[str]:
    name = f"tollgate_bench_storage_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(plain(server_url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(drivername="postgresql+asyncpg", database=name)
    rendered = url.render_as_string(hide_password=False)
    try:
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env={**os.environ, "TOLLGATE_DATABASE_URL": rendered},
            check=True,
            capture_output=True,
        )
        yield rendered
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def submit(env: dict[str, str], count: int) -> list[str]:
    """A tenant with plenty of credits, and ``count`` tasks submitted through the app."""
    from gateway.app import create_app
    from gateway.db import create_engine, session_factory, transaction
    from gateway.ledger import service as ledger
    from gateway.ledger.models import EntryKind
    from gateway.tenants import create_tenant, issue_key

    settings = settings_from(env)
    engine = create_engine(settings)
    try:
        async with transaction(session_factory(engine)) as session:
            tenant = await create_tenant(session, name=f"bench-{secrets.token_hex(4)}")
            await ledger.credit(
                session,
                tenant.id,
                10**15,
                kind=EntryKind.TOPUP,
                idempotency_key=f"bench:{tenant.id}",
            )
            key = (await issue_key(session, tenant, name="bench")).secret
    finally:
        await engine.dispose()
    ids = []
    async with AsyncTestClient(app=create_app(settings), base_url="http://bench.local") as client:
        for _ in range(count):
            response = await client.post(
                "/v1/images/generations", json=BODY, headers={"Authorization": f"Bearer {key}"}
            )
            response.raise_for_status()
            ids.append(response.json()["id"])
    return ids


async def progress(database_url: str, ids: list[str]) -> tuple[int, int, float | None]:
    conn = await asyncpg.connect(plain(database_url))
    try:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'completed'), "
            "count(*) FILTER (WHERE status IN ('failed', 'cancelled')), "
            "extract(epoch FROM max(finished_at) - min(started_at)) "
            "FROM tasks WHERE id = ANY($1)",
            ids,
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row[0]), int(row[1]), None if row[2] is None else float(row[2])


async def count_objects(env: dict[str, str], ids: list[str]) -> tuple[int, int]:
    """Every result the tasks name, opened in the store: how many, and their bytes."""
    from gateway.storage import build_storage

    store = build_storage(settings_from(env))
    conn = await asyncpg.connect(plain(env["TOLLGATE_DATABASE_URL"]))
    try:
        rows = await conn.fetch("SELECT results FROM tasks WHERE id = ANY($1)", ids)
    finally:
        await conn.close()
    objects = size = 0
    for row in rows:
        for key in json.loads(row[0]) if row[0] else []:
            found = await store.open(key)
            if found is not None:
                objects += 1
                size += sum([len(chunk) async for chunk in found.chunks])
    return objects, size


def settings_from(env: dict[str, str]) -> Any:
    """The settings a process started with ``env`` reads (JSON values parsed as it would)."""
    from gateway.settings import load_settings

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def measure(args: argparse.Namespace, backend: str, workdir: Path, sim_url: str) -> dict[str, Any]:
    tag = secrets.token_hex(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOLLGATE_", "AWS_"))}
    upstream = {"base_url": sim_url, "api_key": SIM_KEY}
    env.update(
        {
            "TOLLGATE_REDIS_URL": args.redis_url,
            "TOLLGATE_ADMIN_TOKEN": secrets.token_hex(16),
            "TOLLGATE_SIGNING_SECRET": secrets.token_hex(16),
            "TOLLGATE_UPSTREAMS": json.dumps({"siliconflow": upstream}),
            "TOLLGATE_QUEUE_NAME": f"tollgate-bench-storage-{tag}:queue",
            "TOLLGATE_METRICS_PORT": "0",
            "TOLLGATE_LOG_LEVEL": "WARNING",
            "TOLLGATE_DEFAULT_KEY_RATE_LIMIT_PER_MINUTE": "0",
            "TOLLGATE_DEFAULT_TENANT_RATE_LIMIT_PER_MINUTE": "0",
            "TOLLGATE_DEFAULT_MAX_IN_FLIGHT": "0",
            "TOLLGATE_RETENTION_INTERVAL_SECONDS": "0",
            "NO_PROXY": "*",
            "no_proxy": "*",
        }
    )
    with contextlib.ExitStack() as stack:
        if backend == "s3":
            port = free_port()
            moto = stack.enter_context(
                process(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    workdir / "moto.log",
                )
            )
            wait_http(f"http://127.0.0.1:{port}/moto-api/", moto)
            httpx.put(f"http://127.0.0.1:{port}/bench", trust_env=False).raise_for_status()
            env.update(
                {
                    "TOLLGATE_STORAGE_URL": "s3://bench/results",
                    "TOLLGATE_STORAGE_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                    "TOLLGATE_STORAGE_ACCESS_KEY_ID": S3_KEY,
                    "TOLLGATE_STORAGE_SECRET_ACCESS_KEY": S3_SECRET,
                }
            )
        else:
            folder = workdir / f"storage-{tag}"
            folder.mkdir()
            env["TOLLGATE_STORAGE_URL"] = f"file://{folder}"
        db = stack.enter_context(database(args.database_url))
        env["TOLLGATE_DATABASE_URL"] = db
        try:
            say(f"{backend}: submitting {args.tasks} tasks with no worker running")
            ids = asyncio.run(submit(env, args.tasks))
            say(f"{backend}: one worker runs them")
            with process(
                [sys.executable, "-m", "workers"], workdir / f"worker-{backend}.log", env
            ) as worker:
                deadline = time.monotonic() + args.tasks + 120
                while True:
                    done, failed, span = asyncio.run(progress(db, ids))
                    if done + failed >= len(ids):
                        break
                    if worker.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{backend}: the worker stopped at {done} tasks")
                    time.sleep(0.25)
            objects, size = asyncio.run(count_objects(env, ids))
        finally:
            with Redis.from_url(args.redis_url) as redis:
                queue = env["TOLLGATE_QUEUE_NAME"]
                redis.delete(queue, f"{queue}:ledger-check", f"{queue}:retention")
    return {
        "backend": backend,
        "tasks": len(ids),
        "completed": done,
        "failed": failed,
        "objects_stored": objects,
        "bytes_stored": size,
        "tasks_per_s": round(done / span, 1) if span else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="a server URL; a database is made")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--backends", default="file,s3")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-storage-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        with process(
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
                "0",
            ],
            workdir / "simulator.log",
        ) as sim:
            sim_url = f"http://127.0.0.1:{port}"
            wait_http(f"{sim_url}/_sim/stats", sim)
            for backend in args.backends.split(","):
                results.append(measure(args, backend.strip(), workdir, sim_url))
    print("| backend | tasks | completed | failed | objects stored | MB stored | tasks/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['backend']} | {r['tasks']} | {r['completed']} | {r['failed']} | "
            f"{r['objects_stored']} | {r['bytes_stored'] / 1e6:.1f} | {r['tasks_per_s']} |"
        )
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = all(r["completed"] == r["tasks"] == r["objects_stored"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
