"""``tollgate codes``: make and list redemption codes (rules: ``gateway/redemption``)."""

from decimal import Decimal, InvalidOperation
from typing import Any

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import aware_time, emit, run_in_session
from gateway.ledger.service import parse_amount
from gateway.redemption import service as redemption


@click.group()
def codes() -> None:
    """Make and list redemption codes."""


@codes.command("create")
@click.option("--amount", required=True, help="Credits each code is worth (exact decimal).")
@click.option("--count", type=click.IntRange(1, redemption.MAX_COUNT), default=1, show_default=True)
@click.option("--expires-at", default=None, help="ISO 8601 time with offset.")
@click.option("--note", default="", help="Why the batch was made.")
def codes_create(amount: str, count: int, expires_at: str | None, note: str) -> None:
    """Make COUNT codes worth AMOUNT credits each. The codes are printed once; store them."""
    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise click.BadParameter(
            f"{amount!r} is not a decimal number", param_hint="--amount"
        ) from None
    expiry = aware_time(expires_at, "--expires-at")

    async def run(session: AsyncSession) -> dict[str, Any]:
        batch, made = await redemption.create_batch(
            session, amount_micros=parse_amount(value), count=count, expires_at=expiry, note=note
        )
        return {**redemption.batch_json(batch), "codes": made}

    emit(run_in_session(run))


@codes.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
def codes_list(limit: int) -> None:
    """Batches, newest first, with each code's use: by which tenant and key, when."""

    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        return await redemption.list_batches(session, limit)

    emit(run_in_session(run))
