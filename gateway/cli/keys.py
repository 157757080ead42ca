"""``tollgate keys``: issue, list, rotate and revoke API keys."""

from typing import Any

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import aware_time, emit, run_in_session, settings_or_exit
from gateway.tenants.keys import MAX_GRACE_SECONDS, rotate_key
from gateway.tenants.service import find_tenant, issue_key, key_json, list_keys, revoke_key


@click.group()
def keys() -> None:
    """Issue, list, rotate and revoke API keys."""


@keys.command("issue")
@click.argument("tenant")
@click.option("--name", default="", help="A label for the key.")
@click.option("--expires-at", default=None, help="ISO 8601 time with offset; refused after it.")
@click.option(
    "--no-key-management",
    is_flag=True,
    help="Without the can_manage_keys scope: the key cannot use the tenant's /v1/keys routes.",
)
def keys_issue(tenant: str, name: str, expires_at: str | None, no_key_management: bool) -> None:
    """Issue a key for TENANT (id or name). The key is printed once; store it."""
    expiry = aware_time(expires_at, "--expires-at")

    async def run(session: AsyncSession) -> dict[str, Any]:
        issued = await issue_key(
            session,
            await find_tenant(session, tenant),
            name=name,
            expires_at=expiry,
            can_manage_keys=not no_key_management,
        )
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


@keys.command("rotate")
@click.argument("key_id")
@click.option(
    "--grace",
    "grace_seconds",
    type=click.IntRange(0, MAX_GRACE_SECONDS),
    default=None,
    help="Seconds the old secret keeps working (default TOLLGATE_KEY_ROTATION_GRACE_SECONDS).",
)
def keys_rotate(key_id: str, grace_seconds: int | None) -> None:
    """Give KEY_ID a new secret (printed once); the old one works for the grace period."""
    grace = grace_seconds
    if grace is None:
        grace = settings_or_exit().key_rotation_grace_seconds

    async def run(session: AsyncSession) -> dict[str, Any]:
        issued = await rotate_key(session, key_id, grace)
        return {**key_json(issued.key), "key": issued.secret}

    emit(run_in_session(run))
