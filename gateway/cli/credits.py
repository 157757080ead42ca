"""``tollgate credits`` (top up, adjust, refund, show) and ``tollgate usage``."""

from decimal import Decimal, InvalidOperation
from typing import Any

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import emit, run_in_session
from gateway.ledger import reports
from gateway.ledger import service as ledger
from gateway.ledger.models import EntryKind
from gateway.ledger.schemas import CreditChange
from gateway.tenants.service import find_tenant


@click.group()
def credits() -> None:
    """Top up, adjust, refund and show tenants' credits."""


def _credit_command(
    tenant: str,
    amount: str,
    reason: str,
    key: str | None,
    kind: EntryKind,
    task_id: str | None = None,
) -> None:
    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise click.BadParameter(
            f"{amount!r} is not a decimal number", param_hint="AMOUNT"
        ) from None

    async def run(session: AsyncSession) -> dict[str, Any]:
        found = await find_tenant(session, tenant)
        change = CreditChange(amount=value, reason=reason, idempotency_key=key, task_id=task_id)
        return await ledger.change_credits(session, found.id, change, kind)

    emit(run_in_session(run))


@credits.command("topup")
@click.argument("tenant")
@click.argument("amount")
@click.option("--reason", default="", help="Shown in the ledger.")
@click.option("--idempotency-key", default=None, help="Retrying with the same key adds once.")
def credits_topup(tenant: str, amount: str, reason: str, idempotency_key: str | None) -> None:
    """Add AMOUNT credits (an exact decimal, e.g. 12.5) to TENANT."""
    _credit_command(tenant, amount, reason, idempotency_key, EntryKind.TOPUP)


# A negative AMOUNT ("-2") is an argument, not an unknown option.
@credits.command("adjust", context_settings={"ignore_unknown_options": True})
@click.argument("tenant")
@click.argument("amount")
@click.option("--reason", required=True, help="Why: kept in the ledger.")
@click.option("--idempotency-key", default=None)
@click.option("--task", "task_id", default=None, help="The task it is for (usage `adjusted`).")
def credits_adjust(
    tenant: str, amount: str, reason: str, idempotency_key: str | None, task_id: str | None
) -> None:
    """Change TENANT's credits by AMOUNT, which may be negative (acme -2.5 --reason …)."""
    _credit_command(tenant, amount, reason, idempotency_key, EntryKind.ADJUSTMENT, task_id)


@credits.command("show")
@click.argument("tenant")
def credits_show(tenant: str) -> None:
    """TENANT's balance, held credits, available credits and open holds."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        found = await find_tenant(session, tenant)
        return ledger.balance_json(found.id, await ledger.balance(session, found.id))

    emit(run_in_session(run))


@credits.command("refund")
@click.argument("task_id")
@click.option("--amount", default=None, help="Credits to give back (default: all that is left).")
@click.option("--reason", required=True)
def credits_refund(task_id: str, amount: str | None, reason: str) -> None:
    """Refund part or all of what TASK_ID was charged."""
    micros = None if amount is None else ledger.parse_amount(Decimal(amount))

    async def run(session: AsyncSession) -> dict[str, Any]:
        return {
            "task_id": task_id,
            "refunded_micros": await ledger.refund(session, task_id, micros, reason),
        }

    emit(run_in_session(run))


@click.command()
@click.argument("tenant")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), default=None, help="First day (UTC).")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), default=None, help="Last day (UTC).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of JSON.")
def usage(tenant: str, since: Any, until: Any, as_csv: bool) -> None:
    """TENANT's usage by model and day: tasks, images, charged, upstream cost, margin."""

    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        found = await find_tenant(session, tenant)
        return await reports.usage(
            session, found.id, since.date() if since else None, until.date() if until else None
        )

    report = run_in_session(run)
    if as_csv:
        click.echo(reports.usage_csv(report), nl=False)
    else:
        emit(report)
