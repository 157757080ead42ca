"""Start-up refuses bad configuration with messages that say what to do."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import ENCRYPTION_KEYS, ROOT, SERVER_URL, _plain
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import make_url

from gateway.app import create_app
from gateway.db import DatabaseNotReady, check_migrated, create_engine
from gateway.settings import Settings, SettingsError, load_settings
from pricing.catalog import CatalogError


def test_missing_settings_are_named_by_their_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TOLLGATE_"):
            monkeypatch.delenv(name)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    for variable in (
        "TOLLGATE_DATABASE_URL",
        "TOLLGATE_REDIS_URL",
        "TOLLGATE_ADMIN_TOKEN",
        "TOLLGATE_SIGNING_SECRET",
        "TOLLGATE_ENCRYPTION_KEYS",
    ):
        assert f"{variable}: is required" in message


def test_invalid_values_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_DATABASE_URL", "mysql://nope")
    monkeypatch.setenv("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("TOLLGATE_ADMIN_TOKEN", "short")
    monkeypatch.setenv("TOLLGATE_SIGNING_SECRET", "0123456789abcdef")
    monkeypatch.setenv("TOLLGATE_UPSTREAMS", '{"krea": {"base_url": "not a url"}}')
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "TOLLGATE_DATABASE_URL: Value error, must be a postgresql://" in message
    assert "TOLLGATE_ADMIN_TOKEN" in message
    assert "TOLLGATE_UPSTREAMS (krea.base_url)" in message
    assert "TOLLGATE_UPSTREAMS (krea.api_key): is required" in message


def required_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the required settings in the environment, none of the outbound ones."""
    for name in list(os.environ):
        if name.startswith("TOLLGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TOLLGATE_DATABASE_URL", "postgresql://db/tollgate")
    monkeypatch.setenv("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("TOLLGATE_ADMIN_TOKEN", "0123456789abcdef")
    monkeypatch.setenv("TOLLGATE_SIGNING_SECRET", "0123456789abcdef")
    monkeypatch.setenv("TOLLGATE_ENCRYPTION_KEYS", ENCRYPTION_KEYS)


def test_the_old_callback_names_of_the_outbound_settings_still_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    required_env(monkeypatch)
    monkeypatch.setenv("TOLLGATE_CALLBACK_ALLOWED_HOSTS", '["receiver.test"]')
    monkeypatch.setenv("TOLLGATE_CALLBACK_CA_BUNDLE", "/etc/old-ca.pem")
    settings = load_settings()
    assert settings.outbound_allowed_hosts == ["receiver.test"]
    assert settings.outbound_ca_bundle == Path("/etc/old-ca.pem")


def test_the_new_outbound_names_win_over_the_old_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    required_env(monkeypatch)
    monkeypatch.setenv("TOLLGATE_CALLBACK_ALLOWED_HOSTS", '["old.test"]')
    monkeypatch.setenv("TOLLGATE_CALLBACK_CA_BUNDLE", "/etc/old-ca.pem")
    monkeypatch.setenv("TOLLGATE_OUTBOUND_ALLOWED_HOSTS", '["new.test"]')
    monkeypatch.setenv("TOLLGATE_OUTBOUND_CA_BUNDLE", "/etc/new-ca.pem")
    settings = load_settings()
    assert settings.outbound_allowed_hosts == ["new.test"]
    assert settings.outbound_ca_bundle == Path("/etc/new-ca.pem")
    # Unset, they are empty; a name without the prefix is not read.
    for name in ("CALLBACK_ALLOWED_HOSTS", "CALLBACK_CA_BUNDLE", "OUTBOUND_ALLOWED_HOSTS"):
        monkeypatch.delenv("TOLLGATE_" + name)
    monkeypatch.delenv("TOLLGATE_OUTBOUND_CA_BUNDLE")
    monkeypatch.setenv("OUTBOUND_ALLOWED_HOSTS", '["unprefixed.test"]')
    settings = load_settings()
    assert (settings.outbound_allowed_hosts, settings.outbound_ca_bundle) == ([], None)


def test_a_bad_outbound_value_is_named_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    required_env(monkeypatch)
    monkeypatch.setenv("TOLLGATE_CALLBACK_ALLOWED_HOSTS", '[{"not": "a host"}]')
    with pytest.raises(SettingsError, match=r"  TOLLGATE_OUTBOUND_ALLOWED_HOSTS \(0\): "):
        load_settings()


def test_a_malformed_catalogue_stops_the_app_naming_entry_and_field(
    settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "catalog.toml"
    shipped = (ROOT / "pricing" / "catalog.toml").read_text()
    bad.write_text(shipped.replace('amount = "0.37"', "amount = 0.37"))
    with pytest.raises(CatalogError, match=r"flux-1-pro\)\.upstream_cost\.amount"):
        create_app(settings.model_copy(update={"catalog_path": bad}))


async def test_an_unmigrated_database_is_refused_with_the_command_to_run(
    settings: Settings,
) -> None:
    name = f"tollgate_empty_{os.getpid()}"
    server = _plain(SERVER_URL)
    conn = await asyncpg.connect(server)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = make_url(SERVER_URL).set(drivername="postgresql+asyncpg", database=name)
    empty = settings.model_copy(update={"database_url": url.render_as_string(False)})
    engine = create_engine(empty)
    try:
        with pytest.raises(DatabaseNotReady, match="run `tollgate migrate`"):
            await check_migrated(engine)
    finally:
        await engine.dispose()
    env = {**os.environ, "TOLLGATE_DATABASE_URL": empty.database_url}
    env.update(
        TOLLGATE_REDIS_URL=settings.redis_url,
        TOLLGATE_ADMIN_TOKEN=settings.admin_token,
        TOLLGATE_SIGNING_SECRET=settings.signing_secret,
        TOLLGATE_ENCRYPTION_KEYS=settings.encryption_keys,
    )
    served = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway.cli", "serve", "--port", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert served.returncode != 0
    assert "not migrated" in served.stderr
    assert "tollgate migrate" in served.stderr
    conn = await asyncpg.connect(server)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


async def test_health_answers_without_credentials(client: AsyncTestClient[Any]) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("revision", "ready"),
    [("0004", False), ("9999_from_a_newer_release", True)],
    ids=["older: refused", "newer: accepted during a rolling upgrade"],
)
async def test_an_older_schema_is_refused_and_a_newer_one_accepted(
    settings: Settings, revision: str, ready: bool
) -> None:
    name = f"tollgate_rev_{os.getpid()}"
    server = _plain(SERVER_URL)
    conn = await asyncpg.connect(server)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = make_url(SERVER_URL).set(drivername="postgresql+asyncpg", database=name)
    other = settings.model_copy(update={"database_url": url.render_as_string(False)})
    conn = await asyncpg.connect(_plain(other.database_url))
    await conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
    await conn.execute("INSERT INTO alembic_version VALUES ($1)", revision)
    await conn.close()
    engine = create_engine(other)
    try:
        if ready:
            await check_migrated(engine)
        else:
            with pytest.raises(DatabaseNotReady, match="at revision 0004"):
                await check_migrated(engine)
    finally:
        await engine.dispose()
        conn = await asyncpg.connect(server)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


_FREEZE_PROBE = """
import asyncio, gc
from litestar.testing import AsyncTestClient
from gateway.app import app_from_env

async def main() -> None:
    before = gc.get_freeze_count()
    async with AsyncTestClient(app=app_from_env()) as client:
        assert (await client.get("/healthz")).status_code == 200
        print(before, gc.get_freeze_count())

asyncio.run(main())
"""


async def test_a_started_gateway_exempts_its_start_up_objects_from_the_collector(
    settings: Settings,
) -> None:
    """gateway/heap.py: the app's start-up heap is frozen once it has started, so full
    collections no longer walk it (a 60–270 ms pause of the event loop each)."""
    env = {
        **os.environ,
        "TOLLGATE_DATABASE_URL": settings.database_url,
        "TOLLGATE_REDIS_URL": settings.redis_url,
        "TOLLGATE_ADMIN_TOKEN": settings.admin_token,
        "TOLLGATE_SIGNING_SECRET": settings.signing_secret,
        "TOLLGATE_ENCRYPTION_KEYS": settings.encryption_keys,
    }
    probed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _FREEZE_PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probed.returncode == 0, probed.stderr
    before, after = (int(n) for n in probed.stdout.split())
    assert before == 0
    assert after > 50_000  # the app, its schemas, the catalogue and the libraries
