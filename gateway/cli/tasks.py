"""``tollgate tasks``: inspect tasks."""

from typing import Any

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import emit, run_in_session
from gateway.tasks.service import list_tasks, task_summary
from gateway.tenants.service import find_tenant


@click.group()
def tasks() -> None:
    """Inspect tasks."""


@tasks.command("list")
@click.option("--tenant", default=None, help="Tenant id or name.")
@click.option("--status", default=None)
@click.option("--limit", default=50, show_default=True, type=int)
def tasks_list(tenant: str | None, status: str | None, limit: int) -> None:
    """List tasks, newest first."""

    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        tenant_id = (await find_tenant(session, tenant)).id if tenant else None
        found = await list_tasks(session, tenant_id=tenant_id, status=status, limit=limit)
        return [task_summary(t) for t in found]

    emit(run_in_session(run))
