"""``tollgate groups``, ``tollgate rates``, ``tollgate price-changes``, ``tollgate usage-export``.

The same services as ``/admin/groups``, ``/admin/exchange-rates``, ``/admin/price-changes``
and ``/admin/usage/tasks``; a change is recorded with the actor ``cli:<user>`` (or
``--actor``) and reaches every gateway within its ``TOLLGATE_KEY_CACHE_TTL_SECONDS``.
"""

import getpass
from datetime import UTC
from typing import Any

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import emit, run_in_session, settings_or_exit
from gateway.ledger import reports
from gateway.prices import service as prices
from gateway.prices.book import SessionRows, Snapshot, load_snapshot
from pricing.catalog import Catalog, load_catalog


def _catalog() -> Catalog:
    return load_catalog(settings_or_exit().catalog_path)


async def _snapshot(session: AsyncSession) -> Snapshot:
    return await load_snapshot(SessionRows(session), _catalog())


def _default_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment
        return "cli"


actor_option = click.option("--actor", default=None, help="Who makes the change (for the record).")


@click.group()
def groups() -> None:
    """User groups and their prices."""


@groups.command("list")
def list_groups() -> None:
    """Every group: multiplier, description, models with their own price."""

    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        snapshot = await _snapshot(session)
        return [prices.group_view(snapshot, name) for name in sorted(snapshot.groups)]

    emit(run_in_session(run))


@groups.command("create")
@click.argument("name")
@click.option("--multiplier", default="1", help="Decimal multiplier on catalogue prices.")
@click.option("--description", default="", help="What the group is for.")
@actor_option
def create_group(name: str, multiplier: str, description: str, actor: str | None) -> None:
    """Create the group NAME."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        who = actor or _default_actor()
        return await prices.create_group(session, _catalog(), name, multiplier, description, who)

    emit(run_in_session(run))


@groups.command("set")
@click.argument("name")
@click.option("--multiplier", default=None, help="New decimal multiplier.")
@click.option("--description", default=None, help="New description.")
@actor_option
def update_group(
    name: str, multiplier: str | None, description: str | None, actor: str | None
) -> None:
    """Change the multiplier or description of the group NAME."""
    changes = {
        k: v for k, v in (("multiplier", multiplier), ("description", description)) if v is not None
    }
    if not changes:
        raise click.UsageError("give --multiplier or --description")

    async def run(session: AsyncSession) -> dict[str, Any]:
        return await prices.update_group(
            session, _catalog(), name, changes, actor or _default_actor()
        )

    emit(run_in_session(run))


@groups.command("prices")
@click.argument("name")
def group_prices(name: str) -> None:
    """Every model's effective price for the group NAME, and where it comes from."""

    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        return prices.model_prices(await _snapshot(session), name)

    emit(run_in_session(run))


@groups.command("set-price")
@click.argument("group")
@click.argument("model")
@click.argument("amount")
@click.option("--rule", default=None, help="per_call, per_image or per_megapixel_step.")
@click.option("--quality", "qualities", multiple=True, help="TIER=AMOUNT, for a quality tier.")
@click.option("--with-style-references", default=None, help="Price with style references.")
@click.option("--with-moodboard", default=None, help="Price with a moodboard.")
@actor_option
def set_price(
    group: str,
    model: str,
    amount: str,
    rule: str | None,
    qualities: tuple[str, ...],
    with_style_references: str | None,
    with_moodboard: str | None,
    actor: str | None,
) -> None:
    """Set GROUP's own price for MODEL, in credits (AMOUNT per the rule's unit)."""
    body: dict[str, Any] = {"amount": amount}
    if qualities:
        tiers = {}
        for item in qualities:
            tier, eq, figure = item.partition("=")
            if not eq or not tier or not figure:
                raise click.BadParameter(f"{item!r}: give TIER=AMOUNT", param_hint="'--quality'")
            tiers[tier] = figure
        body["by_quality"] = tiers
    for name, value in (
        ("with_style_references", with_style_references),
        ("with_moodboard", with_moodboard),
    ):
        if value is not None:
            body[name] = value

    async def run(session: AsyncSession) -> dict[str, Any]:
        catalog = _catalog()
        entry = catalog.model(model)
        body["rule"] = rule or (entry.price.rule if entry else "per_call")
        return await prices.set_group_price(
            session, catalog, group, model, body, actor or _default_actor()
        )

    emit(run_in_session(run))


@groups.command("reset-price")
@click.argument("group")
@click.argument("model")
@actor_option
def reset_price(group: str, model: str, actor: str | None) -> None:
    """Return GROUP's price for MODEL to its default (the catalogue, × the multiplier)."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        await prices.delete_group_price(
            session, _catalog(), group, model, actor or _default_actor()
        )
        return {"group": group, "model": model, "reset": True}

    emit(run_in_session(run))


@click.group()
def rates() -> None:
    """Exchange rates: credits per unit of each upstream currency."""


@rates.command("list")
def list_rates() -> None:
    """The rates in force and their history."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        return await prices.rates_view(session, await _snapshot(session))

    emit(run_in_session(run))


@rates.command("set")
@click.argument("currency")
@click.argument("rate")
@click.option(
    "--effective-at",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    default=None,
    help="When it takes effect (UTC; default now).",
)
@click.option("--note", default="", help="Where the rate comes from.")
@actor_option
def set_rate(currency: str, rate: str, effective_at: Any, note: str, actor: str | None) -> None:
    """Set CURRENCY's rate: RATE credits per unit, from --effective-at on."""
    since = effective_at.replace(tzinfo=UTC) if effective_at else None

    async def run(session: AsyncSession) -> dict[str, Any]:
        return await prices.set_rate(
            session, _catalog(), currency, rate, since, note, actor or _default_actor()
        )

    emit(run_in_session(run))


@click.command("price-changes")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, help="How many, newest first.")
def price_changes(limit: int) -> None:
    """The record of price, group and rate changes: who, when, old, new."""
    emit(run_in_session(lambda session: prices.list_changes(session, limit)))


@click.command("usage-export")
@click.option("--from", "since", type=click.DateTime(["%Y-%m-%d"]), default=None, help="First day.")
@click.option("--to", "until", type=click.DateTime(["%Y-%m-%d"]), default=None, help="Last day.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of JSON.")
def usage_export(since: Any, until: Any, as_csv: bool) -> None:
    """Every tenant's tasks with quoted price, charge, refunds, upstream cost and margin."""

    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        return await reports.task_export(
            session, since.date() if since else None, until.date() if until else None
        )

    export = run_in_session(run)
    if as_csv:
        click.echo(reports.task_export_csv(export), nl=False)
    else:
        emit(export)
