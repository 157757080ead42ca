"""``tollgate users``: console accounts (operators, tenant owners and members)."""

import asyncio
import sys
from typing import Any

import click
from redis.asyncio import Redis
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import emit, run_in_session, settings_or_exit
from gateway.console import accounts
from gateway.console.models import ROLES, ConsoleUser
from gateway.console.sessions import SessionStore
from gateway.errors import NotFound
from gateway.tenants.service import find_tenant


def user_json(user: ConsoleUser) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "role": user.role,
        "tenant_id": user.tenant_id,
        "created_at": user.created_at.isoformat(),
        "disabled": user.disabled_at is not None,
    }


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    value: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return value


@click.group()
def users() -> None:
    """Console accounts: create, list, set a password."""


@users.command("create")
@click.argument("email")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--tenant", default=None, help="The tenant (id or name) of an owner or member.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
@click.option("--if-missing", is_flag=True, help="Exit 0, changing nothing, if EMAIL exists.")
def users_create(
    email: str, role: str, tenant: str | None, password_stdin: bool, if_missing: bool
) -> None:
    """Create a console user: an operator, or a tenant's owner or member."""
    password = _password(password_stdin)

    async def run(session: AsyncSession) -> dict[str, Any]:
        existing = await accounts.find_user(session, email)
        if existing is not None and if_missing:
            return {**user_json(existing), "created": False}
        tenant_id = (await find_tenant(session, tenant)).id if tenant else None
        user = await accounts.create_user(
            session, email=email, password=password, role=role, tenant_id=tenant_id
        )
        return {**user_json(user), "created": True}

    emit(run_in_session(run))


@users.command("list")
@click.option("--tenant", default=None, help="A tenant (id or name); without it, the operators.")
def users_list(tenant: str | None) -> None:
    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        tenant_id = (await find_tenant(session, tenant)).id if tenant else None
        return [user_json(u) for u in await accounts.list_users(session, tenant_id)]

    emit(run_in_session(run))


@users.command("set-password")
@click.argument("email")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
def users_set_password(email: str, password_stdin: bool) -> None:
    """Set EMAIL's password; every console session of EMAIL ends."""
    password = _password(password_stdin)

    async def run(session: AsyncSession) -> dict[str, Any]:
        user = await accounts.find_user(session, email)
        if user is None:
            raise NotFound(f"no console user {email!r}")
        await accounts.set_password(session, user, password)
        return user_json(user)

    changed = run_in_session(run)
    ended = asyncio.run(_end_sessions(changed["id"]))
    emit({**changed, "sessions_ended": ended})


async def _end_sessions(user_id: str) -> int:
    settings = settings_or_exit()
    redis = Redis.from_url(settings.redis_url)
    try:
        return await SessionStore(redis, settings.queue_name).end_all(user_id)
    finally:
        await redis.aclose()
