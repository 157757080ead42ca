"""``tollgate ledger check``: every balance and hold against the ledger."""

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import run_in_session
from gateway.ledger import service as ledger


@click.group(name="ledger")
def ledger_group() -> None:
    """Check the ledger."""


@ledger_group.command("check")
def ledger_check() -> None:
    """Check every tenant's balance and holds against the ledger; exit 1 on any mismatch."""

    async def run(session: AsyncSession) -> list[str]:
        return await ledger.check(session)

    problems = run_in_session(run)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} ledger problem(s)")
    click.echo("ledger ok: every balance and hold matches its entries")
