"""Rate limits across gateway processes: two ``tollgate serve`` processes, one Redis.

The key's limit is set with the CLI, as an operator would. Both processes count
the key's requests in the same GCRA state in Redis (on Redis's clock), so the
burst is shared between them, never doubled.
"""

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    ADMIN_TOKEN,
    ENCRYPTION_KEYS,
    REDIS_URL,
    ROOT,
    bearer,
    free_port,
    make_settings,
    make_tenant_key,
)
from sqlalchemy import text

from gateway.db import create_engine
from gateway.settings import Settings
from gateway.tenants.models import hash_key

BURST = 10


def gateway_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(
        TOLLGATE_DATABASE_URL=database_url,
        TOLLGATE_REDIS_URL=REDIS_URL,
        TOLLGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        TOLLGATE_SIGNING_SECRET="e2e-signing-secret-0123456789",
        TOLLGATE_ENCRYPTION_KEYS=ENCRYPTION_KEYS,
        TOLLGATE_STORAGE_DIR=str(tmp_path / "storage"),
        TOLLGATE_QUEUE_NAME=f"tollgate:e2e-limits:{os.getpid()}:{time.monotonic_ns()}",
        TOLLGATE_LOG_LEVEL="WARNING",
    )
    return env


async def answers(url: str, proc: asyncio.subprocess.Process, wait: float = 30) -> None:
    deadline = time.monotonic() + wait
    async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode} before {url} answered")
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {wait}s")


@pytest.fixture
async def gateways(database_url: str, tmp_path: Path) -> AsyncIterator[list[str]]:
    """Two gateway processes with the same environment, on two ports."""
    env = gateway_env(database_url, tmp_path)
    ports: list[int] = []
    while len(ports) < 2:
        if (port := free_port()) not in ports:
            ports.append(port)
    procs = []
    try:
        for port in ports:
            with (tmp_path / f"gateway-{port}.log").open("wb") as log:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        *("-m", "gateway.cli", "serve", "--port", str(port)),
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=log,
                    )
                )
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        await asyncio.gather(
            *(answers(f"{base}/healthz", proc) for base, proc in zip(bases, procs, strict=True))
        )
        yield bases
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout=15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def tollgate(env: dict[str, str], *args: str) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "gateway.cli", *args),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    shown: dict[str, object] = json.loads(out)
    return shown


async def key_id_of(settings: Settings, key: str) -> str:
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(
                text("SELECT id FROM api_keys WHERE key_hash = :h"), {"h": hash_key(key)}
            )
            return str(found.scalar_one())
    finally:
        await engine.dispose()


async def test_two_gateways_share_one_burst_then_one_more_after_the_interval(
    gateways: list[str], database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, "http://127.0.0.1:9", tmp_path / "storage")
    _, key = await make_tenant_key(settings)
    key_id = await key_id_of(settings, key)
    shown = await tollgate(
        gateway_env(database_url, tmp_path),
        *("limits", "key", key_id, "--rpm", "60", "--burst", str(BURST)),
    )
    assert shown["rate_limit_per_minute"] == {"value": 60, "from": "own"}
    assert shown["rate_limit_burst"] == {"value": BURST, "from": "own"}

    async with httpx.AsyncClient(
        trust_env=False,
        timeout=30,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    ) as http:
        # Warm each process's database pool with a key that does not exist (401, not counted).
        for base in gateways:
            unknown = await http.get(f"{base}/v1/models", headers=bearer("tg_" + "x" * 43))
            assert unknown.status_code == 401

        started = time.monotonic()
        responses = await asyncio.gather(
            *(
                http.get(f"{gateways[i % 2]}/v1/models", headers=bearer(key))
                for i in range(2 * BURST)
            )
        )
        took = time.monotonic() - started
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: BURST, 429: BURST}, f"{statuses} in {took:.2f} s"
        for response in responses:
            assert '"key";q=60;w=60' in response.headers["RateLimit-Policy"]
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "rate_limit_exceeded"
                assert "key" in response.json()["error"]["message"]
                assert response.headers["Retry-After"] == "1"

        # One emission interval (1 s) on, the shared state lets exactly one more through.
        await asyncio.sleep(1.05)
        after = [await http.get(f"{base}/v1/models", headers=bearer(key)) for base in gateways]
        assert [r.status_code for r in after] == [200, 429], f"burst took {took:.2f} s"
