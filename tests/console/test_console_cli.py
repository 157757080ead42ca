"""``tollgate users``: console accounts from the command line, used by the console."""

import asyncio
import json
import sys
from asyncio.subprocess import PIPE
from typing import Any

from conftest import ROOT, cli_env
from console_helpers import Login, log_in
from litestar.testing import AsyncTestClient

from gateway.settings import Settings

Client = AsyncTestClient[Any]


async def tollgate(settings: Settings, *args: str, stdin: str = "") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args,
        cwd=ROOT, env=cli_env(settings),
        stdin=PIPE, stdout=PIPE, stderr=PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_users_create_makes_a_login_once(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    args = ("users", "create", "Ops@Example.com", "--role", "operator", "--password-stdin")
    code, out, err = await tollgate(settings, *args, stdin="a long operator password\n")
    assert code == 0, err
    made = json.loads(out)
    assert made["email"] == "ops@example.com"
    assert made["created"] is True
    again, out, err = await tollgate(settings, *args, stdin="another password!!\n")
    assert again == 1
    assert "already exists" in err
    quiet, out, _ = await tollgate(settings, *args, "--if-missing", stdin="whatever\n")
    assert quiet == 0
    assert json.loads(out)["created"] is False
    await log_in(client, Login("ops@example.com", "a long operator password"))
    assert (await client.get("/console/operator/tenants")).status_code == 200

    short, _, err = await tollgate(
        settings, "users", "create", "x@example.com", "--role", "operator", "--password-stdin",
        stdin="short\n",
    )  # fmt: skip
    assert short == 1
    assert "password" in err
    no_tenant, _, err = await tollgate(
        settings, "users", "create", "y@example.com", "--role", "owner", "--password-stdin",
        stdin="long enough password\n",
    )  # fmt: skip
    assert no_tenant == 1
    assert "tenant" in err
    owner, out, err = await tollgate(
        settings, "users", "create", "owner@example.com", "--role", "owner",
        "--tenant", tenant_key[0], "--password-stdin", stdin="long enough password\n",
    )  # fmt: skip
    assert owner == 0, err
    code, out, _ = await tollgate(settings, "users", "list", "--tenant", tenant_key[0])
    assert [u["email"] for u in json.loads(out)] == ["owner@example.com"]


async def test_set_password_ends_every_session(client: Client, settings: Settings) -> None:
    args = ("users", "create", "reset@example.com", "--role", "operator", "--password-stdin")
    code, _, err = await tollgate(settings, *args, stdin="the first password\n")
    assert code == 0, err
    await log_in(client, Login("reset@example.com", "the first password"))
    code, out, err = await tollgate(
        settings, "users", "set-password", "reset@example.com", "--password-stdin",
        stdin="the second password\n",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["sessions_ended"] == 1
    gone = await client.get("/console/operator/tenants", follow_redirects=False)
    assert gone.status_code == 303
    await log_in(client, Login("reset@example.com", "the second password"))
