"""Webhook secrets and channels' upstream keys are encrypted at rest (issue 13, item 11)."""

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from alembic.script import ScriptDirectory
from conftest import (
    ADMIN_TOKEN,
    ENCRYPTION_KEYS,
    ROOT,
    SERVER_URL,
    _plain,
    bearer,
    run_cli,
)
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import make_url

from gateway.crypto import (
    CHANNEL_API_KEY,
    WEBHOOK_SECRET,
    Keyring,
    KeyringError,
    new_key,
    reencrypt,
    sealed_key_id,
)
from gateway.db import alembic_config, create_engine
from gateway.settings import Settings

Client = AsyncTestClient[Any]
ADMIN = bearer(ADMIN_TOKEN)


# ---------------------------------------------------------------- the keyring


def test_a_sealed_value_names_its_key_and_opens_only_in_its_column() -> None:
    keyring = Keyring.parse(f"k1:{new_key()}")
    sealed = keyring.seal("whsec_abc", WEBHOOK_SECRET)
    assert sealed.startswith("enc:v1:k1:")
    assert "whsec_abc" not in sealed
    assert sealed_key_id(sealed) == "k1"
    assert keyring.open(sealed, WEBHOOK_SECRET) == "whsec_abc"
    # A fresh nonce each time: the same secret never looks the same twice.
    assert keyring.seal("whsec_abc", WEBHOOK_SECRET) != sealed
    with pytest.raises(KeyringError, match="does not open"):
        keyring.open(sealed, CHANNEL_API_KEY)


def test_the_first_key_seals_and_every_listed_key_opens() -> None:
    old, new = new_key(), new_key()
    before = Keyring.parse(f"old:{old}")
    sealed_before = before.seal("sk-upstream", CHANNEL_API_KEY)
    rotated = Keyring.parse(f"new:{new}, old:{old}")
    assert rotated.open(sealed_before, CHANNEL_API_KEY) == "sk-upstream"
    assert sealed_key_id(rotated.seal("x", CHANNEL_API_KEY)) == "new"
    dropped = Keyring.parse(f"new:{new}")
    with pytest.raises(KeyringError, match="key 'old'"):
        dropped.open(sealed_before, CHANNEL_API_KEY)


def test_a_tampered_value_does_not_open() -> None:
    keyring = Keyring.parse(f"k1:{new_key()}")
    sealed = keyring.seal("whsec_abc", WEBHOOK_SECRET)
    at = len(sealed) - 20  # inside the ciphertext, clear of base64's last, partial character
    flipped = sealed[:at] + ("A" if sealed[at] != "A" else "B") + sealed[at + 1 :]
    with pytest.raises(KeyringError, match="does not open"):
        keyring.open(flipped, WEBHOOK_SECRET)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "no key given"),
        ("nokey", "expected id:key"),
        ("bad id:AAAA", "expected id:key"),
        ("k1:!!!", "not URL-safe base64"),
        ("k1:AAAA", "must be 32 bytes"),
        (f"k1:{'A' * 43},k1:{'B' * 43}", "listed twice"),
    ],
)
def test_malformed_keys_are_refused_with_the_reason(spec: str, says: str) -> None:
    with pytest.raises(KeyringError, match=says):
        Keyring.parse(spec)


def test_settings_refuse_missing_or_malformed_keys(settings: Settings) -> None:
    values = settings.model_dump()
    values["encryption_keys"] = "k1:AAAA"
    with pytest.raises(ValueError, match="must be 32 bytes"):
        Settings(**values)


# ---------------------------------------------------------------- a dump holds no secret


async def dump_database(database_url: str) -> str:
    """Every row of every table of the database, as text (what pg_dump would carry)."""
    conn = await asyncpg.connect(_plain(database_url))
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        parts = []
        for row in tables:
            name = row["table_name"]
            rows = await conn.fetch(f'SELECT row_to_json(t)::text AS j FROM "{name}" AS t')
            parts += [f"{name}: {r['j']}" for r in rows]
        return "\n".join(parts)
    finally:
        await conn.close()


async def test_a_database_dump_holds_no_webhook_secret_and_no_upstream_key(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    tenant_id, key = tenant_key
    first = (await client.get("/v1/webhooks/secret", headers=bearer(key))).json()["secret"]
    rotated = await client.post("/v1/webhooks/secret/rotate", headers=bearer(key))
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()["secret"]
    created = await client.post("/admin/tenants", json={"name": f"dump-{tenant_id}"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    upstream_key = "sk-live-" + secrets.token_hex(16)
    channel = await client.post(
        "/admin/channels",
        json={
            "name": f"dump-{tenant_id}",
            "adapter": "krea",
            "base_url": "https://upstream.example",
            "api_key": upstream_key,
            "models": {"krea-2-medium": None},
            # Off: workers of the rest of the suite must never route to it.
            "enabled": False,
        },
        headers=ADMIN,
    )
    assert channel.status_code == 201, channel.text
    changed_key = "sk-live-" + secrets.token_hex(16)
    patched = await client.patch(
        f"/admin/channels/{channel.json()['id']}", json={"api_key": changed_key}, headers=ADMIN
    )
    assert patched.status_code == 200, patched.text

    dump = await dump_database(settings.database_url)
    assert tenant_id in dump  # the dump did read the tenant's row
    for secret in (first, second, upstream_key, changed_key):
        assert secret not in dump
        # Nor the random part on its own (base64 of the secret's bytes).
        assert secret.split("_", 1)[-1].split("-")[-1] not in dump
    assert "whsec_" not in dump
    assert "sk-live-" not in dump

    # Each is still what the tenant, and the workers' engine, read back.
    assert (await client.get("/v1/webhooks/secret", headers=bearer(key))).json()["secret"] == second
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            from sqlalchemy import select

            from gateway.channels.models import Channel
            from gateway.tenants.models import Tenant

            stored = (
                await conn.execute(
                    select(Channel.api_key).where(Channel.id == channel.json()["id"])  # type: ignore[arg-type]
                )
            ).scalar_one()
            assert stored == changed_key
            webhook = (
                await conn.execute(select(Tenant.webhook_secret).where(Tenant.id == tenant_id))  # type: ignore[arg-type]
            ).scalar_one()
            assert webhook == second
    finally:
        await engine.dispose()
    removed = await client.delete(f"/admin/channels/{channel.json()['id']}", headers=ADMIN)
    assert removed.status_code == 204, removed.text


# ---------------------------------------------------------------- a database of its own


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """An empty database of this test's own (migrations and keys change under it)."""
    name = f"tollgate_secrets_{os.getpid()}_{secrets.token_hex(3)}"
    server = _plain(SERVER_URL)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = make_url(SERVER_URL).set(drivername="postgresql+asyncpg", database=name)
    yield url.render_as_string(hide_password=False)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _revision_before_encryption() -> str:
    """The revision before the one that encrypts (it may move as others land before it)."""
    script = ScriptDirectory.from_config(alembic_config())
    for revision in script.walk_revisions():
        if (revision.doc or "").startswith("encrypt webhook signing secrets"):
            before = revision.down_revision
            assert isinstance(before, str)
            return before
    raise AssertionError("no migration encrypts the secrets")


BEFORE = _revision_before_encryption()


def alembic(database_url: str, *args: str, keys: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env["TOLLGATE_DATABASE_URL"] = database_url
    if keys is not None:
        env["TOLLGATE_ENCRYPTION_KEYS"] = keys
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def seed_plaintext(database_url: str) -> tuple[str, str]:
    """A tenant and a channel stored before encryption: (webhook secret, upstream key)."""
    webhook, upstream = "whsec_" + secrets.token_hex(16), "sk-old-" + secrets.token_hex(16)
    conn = await asyncpg.connect(_plain(database_url))
    try:
        await conn.execute(
            "INSERT INTO tenants (id, name, user_group, balance_micros, held_micros, in_flight, "
            "webhook_secret, callback_schedule, created_at) "
            "VALUES ('ten_old', 'old', 'default', 0, 0, 0, $1, 'standard', now())",
            webhook,
        )
        await conn.execute(
            "INSERT INTO channels (id, name, adapter, base_url, api_key, models, priority, "
            "weight, max_concurrency, enabled, created_at, updated_at) VALUES ('ch_old', 'old', "
            "'krea', 'https://u.example', $1, '{}'::jsonb, 0, 1, 1, true, now(), now())",
            upstream,
        )
    finally:
        await conn.close()
    return webhook, upstream


async def read_back(settings: Settings) -> tuple[str, str]:
    """The tenant's webhook secret and the channel's key, read the way the app reads them."""
    from sqlalchemy import select

    from gateway.channels.models import Channel
    from gateway.tenants.models import Tenant

    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            webhook = (
                await conn.execute(select(Tenant.webhook_secret).where(Tenant.id == "ten_old"))  # type: ignore[arg-type]
            ).scalar_one()
            upstream = (
                await conn.execute(select(Channel.api_key).where(Channel.id == "ch_old"))  # type: ignore[arg-type]
            ).scalar_one()
            return webhook, upstream
    finally:
        await engine.dispose()


def settings_for(settings: Settings, database_url: str, keys: str) -> Settings:
    return settings.model_copy(update={"database_url": database_url, "encryption_keys": keys})


async def test_the_migration_encrypts_existing_rows_and_downgrade_decrypts_them(
    settings: Settings, fresh_database: str
) -> None:
    done = alembic(fresh_database, "upgrade", BEFORE, keys=None)
    assert done.returncode == 0, done.stderr
    webhook, upstream = await seed_plaintext(fresh_database)

    # Rows to seal and no key: the migration stops and says what to set.
    refused = alembic(fresh_database, "upgrade", "head", keys=None)
    assert refused.returncode != 0
    assert "TOLLGATE_ENCRYPTION_KEYS is not set" in refused.stderr
    assert webhook in await dump_database(fresh_database)  # nothing half done

    done = alembic(fresh_database, "upgrade", "head", keys=ENCRYPTION_KEYS)
    assert done.returncode == 0, done.stderr
    dump = await dump_database(fresh_database)
    assert webhook not in dump
    assert upstream not in dump
    assert await read_back(settings_for(settings, fresh_database, ENCRYPTION_KEYS)) == (
        webhook,
        upstream,
    )

    done = alembic(fresh_database, "downgrade", BEFORE, keys=ENCRYPTION_KEYS)
    assert done.returncode == 0, done.stderr
    dump = await dump_database(fresh_database)
    assert webhook in dump
    assert upstream in dump


async def test_reencrypt_moves_every_value_to_the_first_key(
    settings: Settings, fresh_database: str
) -> None:
    done = alembic(fresh_database, "upgrade", BEFORE, keys=None)
    assert done.returncode == 0, done.stderr
    webhook, upstream = await seed_plaintext(fresh_database)
    done = alembic(fresh_database, "upgrade", "head", keys=ENCRYPTION_KEYS)
    assert done.returncode == 0, done.stderr

    new = f"rotated:{new_key()}"
    both = settings_for(settings, fresh_database, f"{new},{ENCRYPTION_KEYS}")
    engine = create_engine(both)
    try:
        async with engine.begin() as conn:
            changed = await reencrypt(conn, Keyring.parse(both.encryption_keys))
        assert changed == {WEBHOOK_SECRET: 1, CHANNEL_API_KEY: 1}
        async with engine.begin() as conn:
            again = await reencrypt(conn, Keyring.parse(both.encryption_keys))
        assert again == {WEBHOOK_SECRET: 0, CHANNEL_API_KEY: 0}
    finally:
        await engine.dispose()
    dump = await dump_database(fresh_database)
    assert "enc:v1:test:" not in dump
    assert dump.count("enc:v1:rotated:") == 2

    # The old key can go: the new one alone opens everything.
    assert await read_back(settings_for(settings, fresh_database, new)) == (webhook, upstream)
    with pytest.raises(KeyringError, match="key 'rotated'"):
        await read_back(settings_for(settings, fresh_database, ENCRYPTION_KEYS))


async def test_the_cli_makes_keys_and_reencrypts_under_the_first(
    settings: Settings, fresh_database: str
) -> None:
    code, out, err = await run_cli(settings, "secrets", "new-key", "--id", "k9")
    assert code == 0, err
    made = out.strip()
    assert made.startswith("k9:")
    Keyring.parse(made)  # a key TOLLGATE_ENCRYPTION_KEYS accepts as it is

    done = alembic(fresh_database, "upgrade", "0006", keys=None)
    assert done.returncode == 0, done.stderr
    webhook, upstream = await seed_plaintext(fresh_database)
    done = alembic(fresh_database, "upgrade", "head", keys=ENCRYPTION_KEYS)
    assert done.returncode == 0, done.stderr

    rotated = settings_for(settings, fresh_database, f"{made},{ENCRYPTION_KEYS}")
    code, out, err = await run_cli(rotated, "secrets", "reencrypt")
    assert code == 0, err
    assert json.loads(out) == {"key": "k9", "reencrypted": {WEBHOOK_SECRET: 1, CHANNEL_API_KEY: 1}}
    code, out, err = await run_cli(rotated, "secrets", "reencrypt")
    assert json.loads(out)["reencrypted"] == {WEBHOOK_SECRET: 0, CHANNEL_API_KEY: 0}
    assert await read_back(settings_for(settings, fresh_database, made)) == (webhook, upstream)
