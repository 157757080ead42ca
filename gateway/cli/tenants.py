"""``tollgate tenants``: create, list, change, suspend, resume and delete tenants."""

from typing import Any

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import emit, run_in_session
from gateway.tenants.service import (
    create_tenant,
    delete_tenant,
    find_tenant,
    list_tenants,
    tenant_json,
    update_tenant,
)


@click.group()
def tenants() -> None:
    """Create, list, change, suspend, resume and delete tenants."""


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


def _update(tenant: str, **changes: Any) -> None:
    async def run(session: AsyncSession) -> dict[str, Any]:
        found = await find_tenant(session, tenant)
        return tenant_json(await update_tenant(session, found.id, **changes))

    emit(run_in_session(run))


@tenants.command("update")
@click.argument("tenant")
@click.option("--name", default=None, help="A new name.")
@click.option("--group", "user_group", default=None, help="A new price group.")
def tenants_update(tenant: str, name: str | None, user_group: str | None) -> None:
    """Rename TENANT (id or name) or move it to another group."""
    if name is None and user_group is None:
        raise click.UsageError("give --name or --group")
    _update(tenant, name=name, user_group=user_group)


@tenants.command("suspend")
@click.argument("tenant")
def tenants_suspend(tenant: str) -> None:
    """Suspend TENANT: its submits get 403 tenant_suspended; reads and open tasks go on."""
    _update(tenant, suspended=True)


@tenants.command("resume")
@click.argument("tenant")
def tenants_resume(tenant: str) -> None:
    """Lift TENANT's suspension (not for a deleted tenant)."""
    _update(tenant, suspended=False)


@tenants.command("delete")
@click.argument("tenant")
@click.confirmation_option(prompt="Suspend the tenant for good and revoke all its keys?")
def tenants_delete(tenant: str) -> None:
    """Delete TENANT: suspend it and revoke every key; its ledger and tasks stay."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        found = await find_tenant(session, tenant)
        return tenant_json(await delete_tenant(session, found.id))

    emit(run_in_session(run))
