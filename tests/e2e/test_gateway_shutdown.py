"""Graceful shutdown of ``tollgate serve``: on SIGTERM the listener closes at once, the
request in flight finishes, and the process exits 0.

The request in flight is a submit whose body the client sends slowly, over a raw
socket: the gateway is mid-request when the signal arrives and must still read the
rest, record the task and answer.
"""

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    ROOT,
    Sim,
    cli_env,
    free_port,
    make_tenant_key,
    scalar,
    start_worker,
    stop_worker,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.settings import Settings


@contextlib.asynccontextmanager
async def gateway(
    settings: Settings, tmp_path: Path, grace: int
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    port = free_port()
    env = cli_env(
        settings,
        TOLLGATE_SHUTDOWN_GRACE_SECONDS=str(grace),
        TOLLGATE_STORAGE_DIR=str(tmp_path / "storage"),
    )
    with (tmp_path / "gateway.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
            while True:
                assert proc.returncode is None, (tmp_path / "gateway.log").read_text()
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, "the gateway did not start"
                await asyncio.sleep(0.1)
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def request_head(port: int, key: str, length: int) -> bytes:
    return (
        "POST /v1/images/generations HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {length}\r\n"
        "X-Request-ID: shutdown-in-flight\r\n\r\n"
    ).encode()


async def test_sigterm_finishes_the_request_in_flight_and_exits_0(
    settings: Settings, simulator: Sim, engine: AsyncEngine, tmp_path: Path
) -> None:
    _, key = await make_tenant_key(settings)
    body = json.dumps({"model": "krea-2-turbo", "prompt": "sent slowly"}).encode()
    async with gateway(settings, tmp_path, grace=10) as (proc, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_head(port, key, len(body)) + body[:10])
        await writer.drain()
        await asyncio.sleep(0.3)

        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert await refused(port), "the gateway still accepts connections after SIGTERM"
        assert proc.returncode is None, "the gateway did not wait for the request in flight"

        for start in range(10, len(body), 10):  # the rest, slowly
            writer.write(body[start : start + 10])
            await writer.drain()
            await asyncio.sleep(0.05)
        answer = await asyncio.wait_for(reader.read(), timeout=10)  # until the server closes
        writer.close()
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 0

    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    task = json.loads(payload)
    assert task["status"] == "pending"
    sql = "SELECT request_id FROM tasks WHERE id = :id"
    assert await scalar(engine, sql, id=task["id"]) == "shutdown-in-flight"

    # Leave the task final for the suite's ledger check.
    worker = start_worker(settings)
    try:
        for _ in range(200):
            status = await scalar(engine, "SELECT status FROM tasks WHERE id = :id", id=task["id"])
            if status in ("completed", "failed"):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the task did not finish")
    finally:
        await stop_worker(*worker)


async def test_a_stalled_request_does_not_hold_the_shutdown_past_the_grace(
    settings: Settings, tmp_path: Path
) -> None:
    _, key = await make_tenant_key(settings)
    async with gateway(settings, tmp_path, grace=1) as (proc, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_head(port, key, 1000) + b'{"model": ')  # and never the rest
        await writer.drain()
        await asyncio.sleep(0.3)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
        assert time.monotonic() - began < 6
        writer.close()
