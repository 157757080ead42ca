"""Channels through the admin API and the CLI; an upstream key is written, never read back."""

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import ENCRYPTION_KEYS, ROOT, bearer, cli_env, run_cli, scalar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.channels.models import ADAPTER_NAMES, Channel
from gateway.channels.service import channel_view
from gateway.crypto import CHANNEL_API_KEY, Keyring
from gateway.db import session_factory
from gateway.settings import Settings
from workers.providers import ADAPTERS

Client = AsyncTestClient[Any]
CHANNELS = "/admin/channels"
VIEW_FIELDS = {
    "id",
    "name",
    "adapter",
    "base_url",
    "api_key_set",
    "models",
    "priority",
    "weight",
    "max_concurrency",
    "enabled",
    "upstream_costs",
    "created_at",
    "updated_at",
}
# Channels these tests make are named with this prefix and removed afterwards:
# the table is shared with the routing and worker tests of the same run.
PREFIX = "tc-"


def unique_name() -> str:
    return f"{PREFIX}{uuid.uuid4().hex[:10]}"


def secret_key() -> str:
    """A key no other text could contain by chance."""
    return f"sk-UPSTREAM-SECRET-{uuid.uuid4().hex}"


@pytest.fixture(autouse=True)
async def remove_test_channels(engine: AsyncEngine) -> AsyncIterator[None]:
    yield
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM channels WHERE name LIKE :p"), {"p": f"{PREFIX}%"})


def new_channel(**fields: Any) -> dict[str, Any]:
    """A valid body; disabled and last in priority, so no worker routes to it meanwhile."""
    return {
        "name": unique_name(),
        "adapter": "krea",
        "base_url": "https://api.krea.example",
        "api_key": secret_key(),
        "models": {"krea-2-medium": None, "krea-2-large": "krea/krea-2/large"},
        "priority": -1000,
        "enabled": False,
        **fields,
    }


async def stored_key(engine: AsyncEngine, channel_id: str) -> str:
    """The channel's key as stored: sealed (gateway/crypto.py), opened here to compare."""
    sealed: str = await scalar(engine, "SELECT api_key FROM channels WHERE id = :id", id=channel_id)
    assert sealed.startswith("enc:v1:"), "the key is stored encrypted"
    return Keyring.parse(ENCRYPTION_KEYS).open(sealed, CHANNEL_API_KEY)


def test_adapter_names_are_the_workers_adapters() -> None:
    # The gateway may not import workers, so it keeps its own list of names.
    assert sorted(ADAPTER_NAMES) == sorted(ADAPTERS)
    assert len(set(ADAPTER_NAMES)) == len(ADAPTER_NAMES)


# ---------------------------------------------------------------- admin API


async def test_create_read_change_and_delete_a_channel(
    client: Client, settings: Settings, engine: AsyncEngine
) -> None:
    admin = bearer(settings.admin_token)
    body = new_channel(weight=3, max_concurrency=4)
    created = await client.post(CHANNELS, json=body, headers=admin)
    assert created.status_code == 201, created.text
    channel = created.json()
    assert set(channel) == VIEW_FIELDS
    assert channel["id"].startswith("ch_")
    assert channel["api_key_set"] is True
    assert {k: channel[k] for k in ("name", "adapter", "models", "priority", "weight")} == {
        k: body[k] for k in ("name", "adapter", "models", "priority", "weight")
    }
    assert channel["max_concurrency"] == 4
    assert channel["enabled"] is False
    assert await stored_key(engine, channel["id"]) == body["api_key"]

    listed = await client.get(CHANNELS, headers=admin)
    assert listed.status_code == 200
    assert channel in listed.json()["data"]
    by_id = await client.get(f"{CHANNELS}/{channel['id']}", headers=admin)
    by_name = await client.get(f"{CHANNELS}/{channel['name']}", headers=admin)
    assert by_id.json() == by_name.json() == channel

    new_key = secret_key()
    renamed = unique_name()
    changed = await client.patch(
        f"{CHANNELS}/{channel['name']}",
        json={"name": renamed, "priority": 7, "api_key": new_key, "base_url": "http://h:81/v1/"},
        headers=admin,
    )
    assert changed.status_code == 200, changed.text
    after = changed.json()
    assert (after["name"], after["priority"], after["base_url"]) == (renamed, 7, "http://h:81/v1")
    assert after["models"] == channel["models"]  # fields left out stay
    assert after["updated_at"] > channel["updated_at"]
    assert await stored_key(engine, channel["id"]) == new_key

    gone = await client.delete(f"{CHANNELS}/{renamed}", headers=admin)
    assert gone.status_code == 204
    assert gone.content == b""
    assert (await client.get(f"{CHANNELS}/{channel['id']}", headers=admin)).status_code == 404
    count = await scalar(engine, "SELECT COUNT(*) FROM channels WHERE id = :id", id=channel["id"])
    assert count == 0


async def test_fields_left_out_take_their_defaults(client: Client, settings: Settings) -> None:
    body = new_channel()
    for optional in ("priority", "enabled"):
        del body[optional]
    created = await client.post(CHANNELS, json=body, headers=bearer(settings.admin_token))
    assert created.status_code == 201, created.text
    defaults = {f: Channel.model_fields[f].default for f in ("priority", "weight", "enabled")}
    assert defaults == {"priority": 0, "weight": 1, "enabled": True}
    assert {f: created.json()[f] for f in defaults} == defaults
    assert created.json()["max_concurrency"] == Channel.model_fields["max_concurrency"].default
    # It is enabled at priority 0: take it out of routing at once.
    await client.delete(f"{CHANNELS}/{body['name']}", headers=bearer(settings.admin_token))


async def test_channels_list_highest_priority_first(client: Client, settings: Settings) -> None:
    admin = bearer(settings.admin_token)
    names = []
    for priority in (-900, -700, -800):
        body = new_channel(priority=priority)
        names.append(body["name"])
        assert (await client.post(CHANNELS, json=body, headers=admin)).status_code == 201
    listed = [c["name"] for c in (await client.get(CHANNELS, headers=admin)).json()["data"]]
    assert [n for n in listed if n in names] == [names[1], names[2], names[0]]


# Each bad value is refused with a 400 whose message starts with the field at fault.
BAD_CREATE = [
    ({"name": ""}, "name"),
    ({"name": 5}, "name"),
    ({"name": "has space"}, "name"),
    ({"name": "a/b"}, "name"),
    ({"name": "env:krea"}, "name"),
    ({"name": "ch_0123456789abcdef"}, "name"),
    ({"name": "x" * 101}, "name"),
    ({"adapter": "nope"}, "adapter"),
    ({"adapter": 3}, "adapter"),
    ({"base_url": ""}, "base_url"),
    ({"base_url": "ftp://files.example"}, "base_url"),
    ({"base_url": "api.krea.ai"}, "base_url"),
    ({"base_url": "http://[::1"}, "base_url"),
    ({"base_url": "http://host:99999"}, "base_url"),
    ({"base_url": "https://user:pw@api.example"}, "base_url"),
    ({"base_url": "https://api.example/?key=1"}, "base_url"),
    ({"base_url": "https://api .example"}, "base_url"),
    ({"base_url": "https://api.example/" + "x" * 2048}, "base_url"),
    ({"api_key": ""}, "api_key"),
    ({"api_key": 12345}, "api_key"),
    ({"api_key": "two words"}, "api_key"),
    ({"api_key": "line\nbreak"}, "api_key"),
    ({"api_key": "nul\x00"}, "api_key"),
    ({"api_key": "k" * 4097}, "api_key"),
    ({"models": {}}, "models"),
    ({"models": ["krea-1"]}, "models"),
    ({"models": {"no-such-model": None}}, "models.no-such-model"),
    ({"models": {"krea-1": ""}}, "models.krea-1"),
    ({"models": {"krea-1": 5}}, "models[...]"),  # msgspec's words: the type is in the schema
    ({"models": {"krea-1": "x\x00"}}, "models.krea-1"),
    ({"priority": 1001}, "priority"),
    ({"priority": "high"}, "priority"),
    ({"priority": 1.5}, "priority"),
    ({"priority": True}, "priority"),
    ({"priority": None}, "priority"),
    ({"weight": 0}, "weight"),
    ({"weight": 1001}, "weight"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"enabled": "yes"}, "enabled"),
    ({"owner": "someone"}, "owner"),
]


@pytest.mark.parametrize(("change", "field"), BAD_CREATE)
async def test_a_bad_field_is_a_400_naming_it(
    client: Client, settings: Settings, change: dict[str, Any], field: str
) -> None:
    body = new_channel(**change)
    response = await client.post(CHANNELS, json=body, headers=bearer(settings.admin_token))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"{field}:"), error["message"]


@pytest.mark.parametrize("field", ["name", "adapter", "base_url", "api_key", "models"])
async def test_a_missing_required_field_is_a_400_naming_it(
    client: Client, settings: Settings, field: str
) -> None:
    body = new_channel()
    del body[field]
    response = await client.post(CHANNELS, json=body, headers=bearer(settings.admin_token))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == f"{field}: is required"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "has space"}, "name"),
        ({"name": None}, "name"),
        ({"api_key": ""}, "api_key"),
        ({"api_key": None}, "api_key"),
        ({"models": {}}, "models"),
        ({"models": {"no-such-model": None}}, "models.no-such-model"),
        ({"weight": 0}, "weight"),
        ({"priority": None}, "priority"),
        ({"enabled": None}, "enabled"),
        ({"base_url": "mailto:x@example.com"}, "base_url"),
        ({"id": "ch_other"}, "id"),
        ({"created_at": "2020-01-01"}, "created_at"),
    ],
)
async def test_a_bad_change_is_a_400_naming_the_field_and_changes_nothing(
    client: Client, settings: Settings, change: dict[str, Any], field: str
) -> None:
    admin = bearer(settings.admin_token)
    created = (await client.post(CHANNELS, json=new_channel(), headers=admin)).json()
    response = await client.patch(f"{CHANNELS}/{created['id']}", json=change, headers=admin)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith(f"{field}:")
    assert (await client.get(f"{CHANNELS}/{created['id']}", headers=admin)).json() == created


@pytest.mark.parametrize(
    ("method", "content"),
    [("POST", b"[]"), ("POST", b'"x"'), ("POST", b"{"), ("POST", b"null"), ("PATCH", b"[]")],
)
async def test_a_body_that_is_not_an_object_is_a_400(
    client: Client, settings: Settings, method: str, content: bytes
) -> None:
    admin = bearer(settings.admin_token)
    path = CHANNELS
    if method == "PATCH":
        created = await client.post(CHANNELS, json=new_channel(), headers=admin)
        path = f"{CHANNELS}/{created.json()['id']}"
    response = await client.request(
        method, path, content=content, headers={**admin, "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("header", [None, "Bearer wrong-admin-token-0123456789"])
async def test_every_channel_route_needs_the_admin_token(
    client: Client, settings: Settings, engine: AsyncEngine, header: str | None
) -> None:
    admin = bearer(settings.admin_token)
    body = new_channel()
    channel = (await client.post(CHANNELS, json=body, headers=admin)).json()
    headers = {"Authorization": header} if header else {}
    ref = f"{CHANNELS}/{channel['id']}"
    answers = [
        await client.post(CHANNELS, json=new_channel(), headers=headers),
        await client.get(CHANNELS, headers=headers),
        await client.get(ref, headers=headers),
        await client.patch(ref, json={"priority": 5}, headers=headers),
        await client.delete(ref, headers=headers),
    ]
    assert [a.status_code for a in answers] == [401] * 5
    assert {a.json()["error"]["code"] for a in answers} == {"unauthorized"}
    # Nothing was made, changed or removed.
    assert (await client.get(ref, headers=admin)).json() == channel
    count = await scalar(engine, "SELECT COUNT(*) FROM channels WHERE name LIKE :p", p=PREFIX + "%")
    assert count == 1


async def test_a_tenant_key_is_not_an_admin_token(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    response = await client.get(CHANNELS, headers=bearer(tenant_key[1]))
    assert response.status_code == 401


async def test_a_name_in_use_is_a_409(client: Client, settings: Settings) -> None:
    admin = bearer(settings.admin_token)
    first = (await client.post(CHANNELS, json=new_channel(), headers=admin)).json()
    second = (await client.post(CHANNELS, json=new_channel(), headers=admin)).json()

    again = await client.post(CHANNELS, json=new_channel(name=first["name"]), headers=admin)
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "conflict"
    assert first["name"] in again.json()["error"]["message"]

    clash = await client.patch(
        f"{CHANNELS}/{second['id']}", json={"name": first["name"]}, headers=admin
    )
    assert clash.status_code == 409, clash.text
    assert (await client.get(f"{CHANNELS}/{second['id']}", headers=admin)).json() == second


@pytest.mark.parametrize("ref", ["ch_0000000000000000", "no-such-channel", "nul%00"])
async def test_an_unknown_channel_is_a_404(client: Client, settings: Settings, ref: str) -> None:
    admin = bearer(settings.admin_token)
    answers = [
        await client.get(f"{CHANNELS}/{ref}", headers=admin),
        await client.patch(f"{CHANNELS}/{ref}", json={"priority": 1}, headers=admin),
        await client.delete(f"{CHANNELS}/{ref}", headers=admin),
    ]
    assert [a.status_code for a in answers] == [404, 404, 404], [a.text for a in answers]
    assert {a.json()["error"]["code"] for a in answers} == {"not_found"}


async def test_the_openapi_document_shows_the_channel_routes_without_a_key(
    client: Client,
) -> None:
    spec = (await client.get("/docs/openapi.json")).json()
    paths = spec["paths"]
    assert set(paths[CHANNELS]) == {"get", "post"}
    assert set(paths[CHANNELS + "/{ref}"]) == {"get", "patch", "delete"}
    schemas = spec["components"]["schemas"]

    def schema_of(ref: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = schemas[ref["$ref"].rsplit("/", 1)[1]]
        return found

    post = paths[CHANNELS]["post"]
    new = schema_of(post["requestBody"]["content"]["application/json"]["schema"])
    assert set(new["required"]) == {"name", "adapter", "base_url", "api_key", "models"}
    assert set(new["properties"]) == VIEW_FIELDS - {
        "id",
        "api_key_set",
        "created_at",
        "updated_at",
    } | {"api_key"}
    view = schema_of(post["responses"]["201"]["content"]["application/json"]["schema"])
    assert set(view["properties"]) == VIEW_FIELDS
    assert {"400", "401", "409"} <= set(post["responses"])
    patch = paths[CHANNELS + "/{ref}"]["patch"]
    changes = schema_of(patch["requestBody"]["content"]["application/json"]["schema"])
    assert not changes.get("required")
    assert "204" in paths[CHANNELS + "/{ref}"]["delete"]["responses"]


def test_the_view_of_a_channel_has_no_key() -> None:
    key = secret_key()
    channel = Channel(
        id="ch_0123456789abcdef",
        name="view",
        adapter="krea",
        base_url="https://api.krea.example",
        api_key=key,
        models={"krea-1": None},
    )
    view = channel_view(channel)
    assert set(view) == VIEW_FIELDS
    assert key not in json.dumps(view)
    assert key not in repr(channel)
    assert key not in str(channel)


async def test_the_key_never_leaves_through_the_api_or_the_logs(
    client: Client, settings: Settings, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = bearer(settings.admin_token)
    key, key2 = secret_key(), secret_key()
    body = new_channel(api_key=key)
    ref = f"{CHANNELS}/{body['name']}"
    answers = [
        await client.post(CHANNELS, json=body, headers=admin),
        await client.get(CHANNELS, headers=admin),
        await client.get(ref, headers=admin),
        await client.patch(ref, json={"priority": -999}, headers=admin),
        await client.patch(ref, json={"api_key": key2}, headers=admin),
        # Refusals whose request carries a key.
        await client.post(
            CHANNELS, json=new_channel(name=body["name"], api_key=key), headers=admin
        ),
        await client.post(CHANNELS, json=new_channel(api_key=key, priority="high"), headers=admin),
        await client.post(CHANNELS, json=new_channel(api_key=key, weight=0), headers=admin),
        await client.post(CHANNELS, json=new_channel(api_key=f"{key} x"), headers=admin),
        await client.post(CHANNELS, json=new_channel(api_key=f"{key}\n"), headers=admin),
        await client.post(CHANNELS, json={"api_key": key}, headers=admin),
        await client.post(CHANNELS, json=new_channel(api_key=key, extra=1), headers=admin),
        await client.post(CHANNELS, json=new_channel(api_key=[key]), headers=admin),
        await client.patch(ref, json={"api_key": f"{key2} x"}, headers=admin),
        await client.patch(ref, json={"api_key": key2, "models": {}}, headers=admin),
        await client.patch(f"{CHANNELS}/nope", json={"api_key": key2}, headers=admin),
        await client.post(CHANNELS, json=new_channel(api_key=key), headers={}),
        await client.patch(ref, json={"api_key": key2, "name": "x y"}, headers=admin),
        await client.delete(ref, headers=admin),
        await client.get(ref, headers=admin),
    ]
    statuses = [a.status_code for a in answers]
    expected = [201, 200, 200, 200, 200, 409, *[400] * 9, 404, 401, 400, 204, 404]
    assert statuses == expected, [a.text for a in answers]
    for answer in answers:
        for secret in (key, key2):
            assert secret not in answer.text
            assert secret not in str(answer.headers)
    assert caplog.records, "nothing was logged at DEBUG: the check would prove nothing"
    for secret in (key, key2):
        assert secret not in caplog.text
        assert all(secret not in r.getMessage() for r in caplog.records)


async def test_a_loaded_channel_does_not_show_its_key(
    settings: Settings, engine: AsyncEngine, client: Client
) -> None:
    key = secret_key()
    created = await client.post(
        CHANNELS, json=new_channel(api_key=key), headers=bearer(settings.admin_token)
    )
    async with session_factory(engine)() as session:
        channel = await session.get(Channel, created.json()["id"])
    assert channel is not None
    assert channel.api_key == key
    assert key not in repr(channel)
    assert key not in str(channel)
    assert key not in repr(channel_view(channel))


# ---------------------------------------------------------------- CLI

tollgate = run_cli


async def tollgate_stdin(
    settings: Settings, stdin: bytes, *args: str, **env: str
) -> tuple[int, str, str]:
    """``tollgate ARGS`` with ``stdin`` on its standard input (run_cli gives it none)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        cwd=ROOT,
        env=cli_env(settings, **env),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


MODELS_OPTION = "krea-2-medium,krea-2-large=krea/krea-2/large"


def add_args(name: str, *more: str) -> tuple[str, ...]:
    return (
        *("channels", "add", name, "--adapter", "krea", "--base-url", "https://api.krea.example"),
        *("--models", MODELS_OPTION, "--priority", "-1000", "--disabled", *more),
    )


async def test_cli_adds_lists_shows_updates_enables_disables_and_removes(
    settings: Settings, engine: AsyncEngine
) -> None:
    key, key2 = secret_key(), secret_key()
    name = unique_name()
    code, out, err = await tollgate(
        settings, *add_args(name, "--weight", "3", "--api-key-env", "KREA_KEY"), KREA_KEY=key
    )
    assert code == 0, err
    added = json.loads(out)
    assert set(added) == VIEW_FIELDS
    assert added["name"] == name
    assert added["models"] == {"krea-2-medium": None, "krea-2-large": "krea/krea-2/large"}
    assert (added["priority"], added["weight"], added["enabled"]) == (-1000, 3, False)
    assert added["api_key_set"] is True
    assert await stored_key(engine, added["id"]) == key

    (lc, listed, lerr), (sc, shown, serr), (ic, by_id, ierr) = await asyncio.gather(
        tollgate(settings, "channels", "list"),
        tollgate(settings, "channels", "show", name),
        tollgate(settings, "channels", "show", added["id"]),
    )
    assert (lc, sc, ic) == (0, 0, 0), (lerr, serr, ierr)
    assert added in json.loads(listed)
    assert json.loads(shown) == json.loads(by_id) == added

    renamed = unique_name()
    code, out, err = await tollgate_stdin(
        settings,
        f"{key2}\n".encode(),
        *("channels", "update", name, "--name", renamed, "--priority", "-999"),
        *("--max-concurrency", "2", "--models", "krea-1", "--api-key-stdin"),
    )
    assert code == 0, err
    updated = json.loads(out)
    assert (updated["name"], updated["priority"], updated["max_concurrency"]) == (renamed, -999, 2)
    assert updated["models"] == {"krea-1": None}
    assert updated["weight"] == 3  # options left out stay
    assert await stored_key(engine, added["id"]) == key2  # the newline is not part of the key

    code, out, err = await tollgate(settings, "channels", "enable", renamed)
    assert code == 0, err
    assert json.loads(out)["enabled"] is True
    code, out, err = await tollgate(settings, "channels", "disable", added["id"])
    assert code == 0, err
    assert json.loads(out)["enabled"] is False
    code, out, err = await tollgate(settings, "channels", "update", renamed, "--enabled")
    assert code == 0, err
    assert json.loads(out)["enabled"] is True

    code, out, err = await tollgate(settings, "channels", "remove", renamed)
    assert code == 0, err
    assert json.loads(out) == {"id": added["id"], "name": renamed, "removed": True}
    code, out, err = await tollgate(settings, "channels", "show", renamed)
    assert code == 1
    assert "No channel" in err


async def test_cli_refuses_bad_input_with_exit_2_naming_the_option(settings: Settings) -> None:
    key = secret_key()
    name = unique_name()
    cases = [
        (add_args("has space", "--api-key-env", "K"), "NAME"),
        (add_args(unique_name(), "--api-key-env", "K", "--base-url", "ftp://x"), "--base-url"),
        (add_args(unique_name(), "--api-key-env", "K", "--models", "nope"), "--models"),
        (add_args(unique_name(), "--api-key-env", "K", "--models", "krea-1="), "--models"),
        (add_args(unique_name(), "--api-key-env", "K", "--models", "krea-1,krea-1"), "--models"),
        (add_args(unique_name(), "--api-key-env", "K", "--weight", "0"), "--weight"),
        (add_args(unique_name(), "--api-key-env", "K", "--priority", "high"), "--priority"),
        (add_args(unique_name(), "--api-key-env", "K", "--adapter", "nope"), "--adapter"),
        (add_args(unique_name(), "--api-key-env", "UNSET_VARIABLE"), "--api-key-env"),
        (add_args(unique_name(), "--api-key-env", "EMPTY"), "--api-key-env"),
        (add_args(unique_name(), "--api-key-env", "SPACED"), "--api-key-env"),
        (add_args(unique_name()), "--api-key-env"),
        (add_args(unique_name(), "--api-key-env", "K", "--api-key-stdin"), "--api-key-stdin"),
        (("channels", "add", name, "--adapter", "krea", "--models", "krea-1"), "--base-url"),
        (("channels", "update", name), "nothing to change"),
        (("channels", "update", name, "--max-concurrency", "0"), "--max-concurrency"),
    ]
    results = await asyncio.gather(
        *(tollgate(settings, *args, K=key, EMPTY="", SPACED=f"{key} x") for args, _ in cases)
    )
    for (args, named), (code, out, err) in zip(cases, results, strict=True):
        assert code == 2, (args, out, err)
        assert named in err, (args, err)
        assert out == ""
        assert key not in err


async def test_cli_reports_a_taken_name_and_an_unknown_channel_with_exit_1(
    settings: Settings,
) -> None:
    key = secret_key()
    name = unique_name()
    code, _, err = await tollgate(settings, *add_args(name, "--api-key-env", "K"), K=key)
    assert code == 0, err
    (dup, _, dup_err), (unknown, _, unknown_err), (gone, _, gone_err) = await asyncio.gather(
        tollgate(settings, *add_args(name, "--api-key-env", "K"), K=key),
        tollgate(settings, "channels", "update", "no-such-channel", "--priority", "1"),
        tollgate(settings, "channels", "remove", "no-such-channel"),
    )
    assert dup == 1
    assert f"A channel named '{name}' exists already" in dup_err
    assert (unknown, gone) == (1, 1)
    assert "No channel 'no-such-channel'" in unknown_err
    assert "No channel 'no-such-channel'" in gone_err
    assert key not in dup_err


async def test_the_key_never_leaves_through_the_cli(settings: Settings) -> None:
    key, key2 = secret_key(), secret_key()
    name = unique_name()
    debug = {"TOLLGATE_LOG_LEVEL": "DEBUG", "K": key, "K2": key2}
    runs = [await tollgate(settings, *add_args(name, "--api-key-env", "K"), **debug)]
    runs += await asyncio.gather(
        tollgate(settings, "channels", "list", **debug),
        tollgate(settings, "channels", "show", name, **debug),
        tollgate(settings, *add_args(name, "--api-key-env", "K"), **debug),  # 409
        tollgate(
            settings, *add_args(unique_name(), "--api-key-env", "K", "--weight", "0"), **debug
        ),
        # A key given where the variable's name belongs, or as a plain option.
        tollgate(settings, *add_args(unique_name(), "--api-key-env", key), **debug),
        tollgate(settings, *add_args(unique_name(), "--api-key", key), **debug),
        tollgate(settings, *add_args(unique_name(), f"--api-key={key}"), **debug),
        tollgate(settings, "channels", "update", "no-such-channel", "--api-key-env", "K2", **debug),
    )
    runs.append(
        await tollgate_stdin(
            settings, key2.encode(), "channels", "update", name, "--api-key-stdin", **debug
        )
    )
    runs.append(
        await tollgate_stdin(
            settings,
            f"{key2} x".encode(),
            *("channels", "update", name, "--api-key-stdin"),
            **debug,
        )
    )
    for verb in ("disable", "enable", "disable", "remove"):
        runs.append(await tollgate(settings, "channels", verb, name, **debug))
    assert [code for code, _, _ in runs] == [0, 0, 0, 1, 2, 2, 2, 2, 1, 0, 2, 0, 0, 0, 0], runs
    for _, out, err in runs:
        for secret in (key, key2):
            assert secret not in out
            assert secret not in err
