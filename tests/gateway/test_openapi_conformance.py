"""The OpenAPI document against the wire: schemathesis over every operation (issue 13, 8 and 9).

A real gateway process (``tollgate serve``) on its own database answers
requests schemathesis generates from ``/docs/openapi.json``, valid and not; every
answer must be below 500 and match the document: a documented status, the
documented content type, a body that validates against the documented schema.
Bounded: a few examples per operation, well under a minute in all.
"""

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import schemathesis
from conftest import (
    ADMIN_TOKEN,
    ROOT,
    SERVER_URL,
    _plain,
    cli_env,
    free_port,
    make_settings,
    make_tenant_key,
    wait_http,
)
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.engine import make_url

EXAMPLES_PER_OPERATION = 8
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@contextlib.contextmanager
def own_database() -> Iterator[str]:
    """A migrated database of this module's own: schemathesis creates channels and
    tenants at random, which must not reach the rest of the suite's workers."""
    name = f"tollgate_openapi_{os.getpid()}_{secrets.token_hex(3)}"
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
    try:
        env = {**os.environ, "TOLLGATE_DATABASE_URL": rendered}
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield rendered
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``tollgate serve`` on a free port: its URL and a tenant's key."""
    with own_database() as database_url:
        folder: Path = tmp_path_factory.mktemp("openapi")
        settings = make_settings(database_url, "http://127.0.0.1:9", folder / "storage")
        _, key = asyncio.run(make_tenant_key(settings))
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env=cli_env(settings, TOLLGATE_PUBLIC_BASE_URL=f"http://127.0.0.1:{port}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/healthz", timeout=60, proc=proc)
            yield {"url": url, "key": key}
        finally:
            proc.terminate()
            proc.wait(timeout=30)


FRAMING_HEADERS = {"content-length", "transfer-encoding", "host", "connection"}


def exercise(operation: Any, mode: GenerationMode, base_url: str, token: str) -> None:
    """Send the operation's generated cases; raise on the first that breaks a check."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Any) -> None:
        # A negative case may carry a framing header of its own ("Content-Length: RoLC…"):
        # no client can send that, and the HTTP server refuses it before the app sees it.
        for name in list(case.headers or {}):
            if name.lower() in FRAMING_HEADERS:
                del case.headers[name]
        case.call_and_validate(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            checks=CHECKS,
            timeout=30,
        )

    call()


def test_every_operation_answers_as_documented(gateway: dict[str, str]) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway['url']}/docs/openapi.json", timeout=30)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        token = ADMIN_TOKEN if operation.path.startswith("/admin") else gateway["key"]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                exercise(operation, mode, gateway["url"], token)
            except (Exception, BaseExceptionGroup) as exc:  # every operation reported
                failures.append(f"{operation.method.upper()} {operation.path} ({mode}): {exc}")
    assert operations >= 30
    if failures:
        pytest.fail(f"{len(failures)} operations break the document:\n\n" + "\n\n".join(failures))
