"""``tollgate tenants``: create and list tenants."""

from typing import Any

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import emit, run_in_session
from gateway.tenants.service import create_tenant, list_tenants, tenant_json


@click.group()
def tenants() -> None:
    """Create and list tenants."""


@tenants.command("create")
@click.argument("name")
@click.option("--group", "user_group", default="default", show_default=True)
def tenants_create(name: str, user_group: str) -> None:
    """Create a tenant called NAME."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        return tenant_json(await create_tenant(session, name=name, user_group=user_group))

    emit(run_in_session(run))


@tenants.command("list")
def tenants_list() -> None:
    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        return [tenant_json(t) for t in await list_tenants(session)]

    emit(run_in_session(run))
