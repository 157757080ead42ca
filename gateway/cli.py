"""``tollgate``: the operator's command line.

Reads the same ``TOLLGATE_*`` environment as the gateway and talks to
PostgreSQL directly (no running gateway needed). Output is JSON, one document
per command, so it can be piped into ``jq``. Errors go to stderr with exit 1.
"""

import asyncio
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import click
import msgspec
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.admin import key_json, tenant_json
from gateway.db import (
    DatabaseNotReady,
    alembic_config,
    check_migrated,
    create_engine,
    session_factory,
    transaction,
)
from gateway.errors import ApiError
from gateway.settings import Settings, SettingsError, load_settings
from gateway.tasks.service import list_tasks, task_summary
from gateway.tenants import create_tenant, find_tenant, issue_key, list_keys, revoke_key
from pricing.catalog import load_catalog

T = TypeVar("T")


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


# Credits print as exact JSON numbers, as in the admin API.
_encoder = msgspec.json.Encoder(decimal_format="number", enc_hook=str)


def _emit(value: Any) -> None:
    click.echo(msgspec.json.format(_encoder.encode(value), indent=2).decode())


def _run_in_session(fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run ``fn`` in one committed transaction against a migrated database."""

    async def main() -> T:
        settings = _settings()
        engine = create_engine(settings)
        try:
            await check_migrated(engine)
            async with transaction(session_factory(engine)) as session:
                return await fn(session)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except (ApiError, DatabaseNotReady) as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def main() -> None:
    """Tollgate: API gateway and billing proxy for image generation."""


@main.command()
def migrate() -> None:
    """Bring the database schema to the latest revision (alembic upgrade head)."""
    from alembic import command

    settings = _settings()
    command.upgrade(alembic_config(settings.database_url), "head")
    click.echo("database is at the latest revision", err=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="Gateway processes.")
def serve(host: str, port: int, workers: int) -> None:
    """Run the HTTP gateway."""
    import uvicorn

    settings = _settings()

    async def preflight() -> None:
        engine = create_engine(settings)
        try:
            await check_migrated(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(preflight())
    except DatabaseNotReady as exc:
        raise click.ClickException(str(exc)) from None
    uvicorn.run(
        "gateway.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


@main.group()
def tenants() -> None:
    """Create and list tenants."""


@tenants.command("create")
@click.argument("name")
@click.option("--group", "user_group", default="default", show_default=True)
def tenants_create(name: str, user_group: str) -> None:
    """Create a tenant called NAME."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        return tenant_json(await create_tenant(session, name=name, user_group=user_group))

    _emit(_run_in_session(run))


@tenants.command("list")
def tenants_list() -> None:
    from gateway.tenants import list_tenants

    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        return [tenant_json(t) for t in await list_tenants(session)]

    _emit(_run_in_session(run))


@main.group()
def keys() -> None:
    """Issue, list and revoke API keys."""


@keys.command("issue")
@click.argument("tenant")
@click.option("--name", default="", help="A label for the key.")
def keys_issue(tenant: str, name: str) -> None:
    """Issue a key for TENANT (id or name). The key is printed once; store it."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        issued = await issue_key(session, await find_tenant(session, tenant), name=name)
        return {**key_json(issued.key), "key": issued.secret}

    _emit(_run_in_session(run))


@keys.command("list")
@click.argument("tenant")
def keys_list(tenant: str) -> None:
    """List TENANT's keys (prefixes only; secrets are never stored)."""

    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        found = await find_tenant(session, tenant)
        return [key_json(k) for k in await list_keys(session, found.id)]

    _emit(_run_in_session(run))


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke KEY_ID; every gateway refuses it within TOLLGATE_KEY_CACHE_TTL_SECONDS."""

    async def run(session: AsyncSession) -> dict[str, Any]:
        return key_json(await revoke_key(session, key_id))

    _emit(_run_in_session(run))


@main.group()
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

    _emit(_run_in_session(run))


@main.group()
def credits() -> None:
    """Top up, adjust, refund and show tenants' credits."""


def _credit_command(tenant: str, amount: str, reason: str, key: str | None, kind: Any) -> None:
    from gateway.admin import CreditChange, change_credits

    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise click.BadParameter(
            f"{amount!r} is not a decimal number", param_hint="AMOUNT"
        ) from None

    async def run(session: AsyncSession) -> dict[str, Any]:
        found = await find_tenant(session, tenant)
        change = CreditChange(amount=value, reason=reason, idempotency_key=key)
        return await change_credits(session, found.id, change, kind)

    _emit(_run_in_session(run))


@credits.command("topup")
@click.argument("tenant")
@click.argument("amount")
@click.option("--reason", default="", help="Shown in the ledger.")
@click.option("--idempotency-key", default=None, help="Retrying with the same key adds once.")
def credits_topup(tenant: str, amount: str, reason: str, idempotency_key: str | None) -> None:
    """Add AMOUNT credits (an exact decimal, e.g. 12.5) to TENANT."""
    from gateway.ledger.models import EntryKind

    _credit_command(tenant, amount, reason, idempotency_key, EntryKind.TOPUP)


@credits.command("adjust")
@click.argument("tenant")
@click.argument("amount")
@click.option("--reason", required=True, help="Why: kept in the ledger.")
@click.option("--idempotency-key", default=None)
def credits_adjust(tenant: str, amount: str, reason: str, idempotency_key: str | None) -> None:
    """Change TENANT's credits by AMOUNT (may be negative, e.g. -- -2.5)."""
    from gateway.ledger.models import EntryKind

    _credit_command(tenant, amount, reason, idempotency_key, EntryKind.ADJUSTMENT)


@credits.command("show")
@click.argument("tenant")
def credits_show(tenant: str) -> None:
    """TENANT's balance, held credits, available credits and open holds."""
    from gateway.admin import balance_json
    from gateway.ledger import service as ledger

    async def run(session: AsyncSession) -> dict[str, Any]:
        found = await find_tenant(session, tenant)
        return balance_json(found.id, await ledger.balance(session, found.id))

    _emit(_run_in_session(run))


@credits.command("refund")
@click.argument("task_id")
@click.option("--amount", default=None, help="Credits to give back (default: all that is left).")
@click.option("--reason", required=True)
def credits_refund(task_id: str, amount: str | None, reason: str) -> None:
    """Refund part or all of what TASK_ID was charged."""
    from gateway.admin import parse_amount
    from gateway.ledger import service as ledger

    micros = None if amount is None else parse_amount(Decimal(amount))

    async def run(session: AsyncSession) -> dict[str, Any]:
        return {
            "task_id": task_id,
            "refunded_micros": await ledger.refund(session, task_id, micros, reason),
        }

    _emit(_run_in_session(run))


@main.command()
@click.argument("tenant")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), default=None, help="First day (UTC).")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), default=None, help="Last day (UTC).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of JSON.")
def usage(tenant: str, since: Any, until: Any, as_csv: bool) -> None:
    """TENANT's usage by model and day: tasks, images, charged, upstream cost, margin."""
    from gateway.ledger import reports

    async def run(session: AsyncSession) -> list[dict[str, Any]]:
        found = await find_tenant(session, tenant)
        return await reports.usage(
            session, found.id, since.date() if since else None, until.date() if until else None
        )

    report = _run_in_session(run)
    if as_csv:
        click.echo(reports.usage_csv(report), nl=False)
    else:
        _emit(report)


@main.group()
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
    from gateway.limit_settings import TenantLimits, set_tenant_limits, tenant_limits_json

    settings = _settings()
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
        catalog = load_catalog(settings.catalog_path)
        updated = await set_tenant_limits(session, catalog, found.id, changes)
        return tenant_limits_json(updated, settings)

    _emit(_run_in_session(run))


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
    from gateway.limit_settings import KeyLimits, key_limits_json, set_key_limits

    settings = _settings()
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
        catalog = load_catalog(settings.catalog_path)
        updated = await set_key_limits(session, catalog, key_id, changes)
        return await key_limits_json(session, updated, settings)

    _emit(_run_in_session(run))


@main.group(name="ledger")
def ledger_group() -> None:
    """Check the ledger."""


@ledger_group.command("check")
def ledger_check() -> None:
    """Check every tenant's balance and holds against the ledger; exit 1 on any mismatch."""
    from gateway.ledger import service as ledger

    async def run(session: AsyncSession) -> list[str]:
        return await ledger.check(session)

    problems = _run_in_session(run)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} ledger problem(s)")
    click.echo("ledger ok: every balance and hold matches its entries")


if __name__ == "__main__":
    sys.exit(main())
