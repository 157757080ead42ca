"""``tollgate keys``: issue, list and revoke API keys."""

from typing import Any

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import emit, run_in_session
from gateway.tenants.service import find_tenant, issue_key, key_json, list_keys, revoke_key


@click.group()
def keys() -> None:
    """Issue, list and revoke API keys."""


@keys.command("issue")
@click.argument("tenant")
@click.option("--name", default="", help="A label for the key.")
def keys_issue(tenant: str, name: str) -> None:
    """Issue a key for TENANT (id or name). The key is printed once; store it."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        issued = await issue_key(session, await find_tenant(session, tenant), name=name)
        return {**key_json(issued.key), "key": issued.secret}

    emit(run_in_session(run))


@keys.command("list")
@click.argument("tenant")
def keys_list(tenant: str) -> None:
    """List TENANT's keys (prefixes only; secrets are never stored)."""

    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        found = await find_tenant(session, tenant)
        return [key_json(k) for k in await list_keys(session, found.id)]

    emit(run_in_session(run))


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke KEY_ID; every gateway refuses it within TOLLGATE_KEY_CACHE_TTL_SECONDS."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        return key_json(await revoke_key(session, key_id))

    emit(run_in_session(run))
