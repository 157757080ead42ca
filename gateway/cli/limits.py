"""``tollgate limits``: show or set a tenant's or a key's limits."""

from typing import Any, TypeVar

import click
import msgspec
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.cli.common import emit, run_in_session, settings_or_exit
from gateway.limits.overrides import (
    KeyLimits,
    TenantLimits,
    key_limits_json,
    set_key_limits,
    set_tenant_limits,
    tenant_limits_json,
)
from gateway.tenants.service import find_tenant
from pricing.catalog import load_catalog

T = TypeVar("T")


@click.group()
def limits() -> None:
    """Show or set a tenant's or a key's limits (no option: show)."""


def _limit_value(value: str | None, *, money: bool = False) -> Any:
    """An option's value: a number, or "default"/"none" for null; None when not given."""
    if value is None:
        return msgspec.UNSET
    if value.lower() in ("default", "none", "all"):
        return None
    if money:
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a whole number or 'default'") from None


def _limit_changes(kind: type[T], values: dict[str, Any]) -> T:
    given = {k: v for k, v in values.items() if v is not msgspec.UNSET}
    try:
        return msgspec.convert(given, kind)
    except msgspec.ValidationError as exc:
        raise click.ClickException(f"invalid limit: {exc}") from None


def _models_option(value: str | None) -> Any:
    if value is None:
        return msgspec.UNSET
    if value.lower() == "all":
        return None
    return [m.strip() for m in value.split(",") if m.strip()]


@limits.command("tenant")
@click.argument("tenant")
@click.option("--rpm", default=None, help="Requests per minute (all keys), or 'default'.")
@click.option("--burst", default=None, help="Burst allowance, or 'default'.")
@click.option("--max-in-flight", default=None, help="Tasks pending or processing at once.")
@click.option("--models", default=None, help="Comma-separated model ids, or 'all'.")
def limits_tenant(
    tenant: str, rpm: str | None, burst: str | None, max_in_flight: str | None, models: str | None
) -> None:
    """Show or set TENANT's limits (0 means no limit)."""
    loaded = settings_or_exit()
    changes = _limit_changes(
        TenantLimits,
        {
            "rate_limit_per_minute": _limit_value(rpm),
            "rate_limit_burst": _limit_value(burst),
            "max_in_flight": _limit_value(max_in_flight),
            "allowed_models": _models_option(models),
        },
    )

    async def run(session: AsyncSession) -> dict[str, Any]:
        found = await find_tenant(session, tenant)
        catalog = load_catalog(loaded.catalog_path)
        updated = await set_tenant_limits(session, catalog, found.id, changes)
        return tenant_limits_json(updated, loaded)

    emit(run_in_session(run))


@limits.command("key")
@click.argument("key_id")
@click.option("--rpm", default=None, help="Requests per minute, or 'default'.")
@click.option("--burst", default=None, help="Burst allowance, or 'default'.")
@click.option("--models", default=None, help="Comma-separated model ids, or 'all'.")
@click.option("--budget-total", default=None, help="Credits, or 'none'.")
@click.option("--budget-daily", default=None, help="Credits per UTC day, or 'none'.")
@click.option("--budget-monthly", default=None, help="Credits per UTC month, or 'none'.")
def limits_key(
    key_id: str,
    rpm: str | None,
    burst: str | None,
    models: str | None,
    budget_total: str | None,
    budget_daily: str | None,
    budget_monthly: str | None,
) -> None:
    """Show or set KEY_ID's rate limit, model list and budgets."""
    loaded = settings_or_exit()
    changes = _limit_changes(
        KeyLimits,
        {
            "rate_limit_per_minute": _limit_value(rpm),
            "rate_limit_burst": _limit_value(burst),
            "allowed_models": _models_option(models),
            "budget_total": _limit_value(budget_total, money=True),
            "budget_daily": _limit_value(budget_daily, money=True),
            "budget_monthly": _limit_value(budget_monthly, money=True),
        },
    )

    async def run(session: AsyncSession) -> dict[str, Any]:
        catalog = load_catalog(loaded.catalog_path)
        updated = await set_key_limits(session, catalog, key_id, changes)
        return await key_limits_json(session, updated, loaded)

    emit(run_in_session(run))
