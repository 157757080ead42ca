"""``tollgate``: the operator's command line.

Reads the same ``TOLLGATE_*`` environment as the gateway and talks to
PostgreSQL directly (no running gateway needed). Output is JSON, one document
per command, so it can be piped into ``jq``. Errors go to stderr with exit 1,
or exit 2 for click's usage errors, which name the option (a malformed value;
for ``channels``, any field the service refuses).
"""

import asyncio
import os
import re
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import click
import msgspec
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.admin import key_json, tenant_json
from gateway.channels.models import ADAPTER_NAMES
from gateway.db import (
    DatabaseNotReady,
    alembic_config,
    check_migrated,
    create_engine,
    session_factory,
    transaction,
)
from gateway.errors import ApiError, InvalidRequest
from gateway.settings import Settings, SettingsError, load_settings
from gateway.tasks.service import list_tasks, task_summary
from gateway.tenants import create_tenant, find_tenant, issue_key, list_keys, revoke_key
from pricing.catalog import Catalog, load_catalog

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
    """Run the HTTP gateway.

    On SIGTERM it stops accepting connections, lets the requests in flight finish
    (for at most TOLLGATE_SHUTDOWN_GRACE_SECONDS) and exits 0.
    """
    import signal

    from gateway import server
    from gateway.logs import configure_logging

    settings = _settings()
    configure_logging(settings)

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
    # uvicorn raises the SIGTERM it shut down on again once it is done, to die by it;
    # the shutdown was graceful by then, so end with status 0 instead.
    signal.signal(signal.SIGTERM, _exit_quietly)
    server.run(
        "gateway.app:app_from_env",
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
    )


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


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


# ---------------------------------------------------------------- channels

# The service names the field at fault; the CLI names the option that sets it.
_CHANNEL_OPTIONS = {
    "name": "'--name'",
    "adapter": "'--adapter'",
    "base_url": "'--base-url'",
    "api_key": "'--api-key-env' / '--api-key-stdin'",
    "models": "'--models'",
    "priority": "'--priority'",
    "weight": "'--weight'",
    "max_concurrency": "'--max-concurrency'",
    "enabled": "'--enabled' / '--disabled'",
}
_ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@main.group()
def channels() -> None:
    """Add, list, change and remove channels (upstream accounts).

    An upstream key is never an argument, which would land in shell history
    and in `ps`: --api-key-env VAR names an environment variable holding it,
    --api-key-stdin reads it from standard input. No command prints it.
    """


def _channel_input_error(exc: InvalidRequest, name_hint: str) -> click.BadParameter:
    """The service's 400 as click's bad-parameter error (exit 2), naming the option."""
    field = exc.field or ""
    root = field.split(".", 1)[0]
    hint = name_hint if root == "name" else _CHANNEL_OPTIONS.get(root)
    if field == root:
        detail = exc.message.removeprefix(f"{field}: ")
    else:  # models.<id>: name the model, the option is --models
        detail = exc.message.removeprefix(f"{root}.")
    return click.BadParameter(detail, param_hint=hint)


def _run_channel_command(
    fn: Callable[[AsyncSession, Catalog], Awaitable[T]], *, name_hint: str = "'--name'"
) -> T:
    settings = _settings()
    catalog = load_catalog(settings.catalog_path)

    async def run(session: AsyncSession) -> T:
        try:
            return await fn(session, catalog)
        except InvalidRequest as exc:
            raise _channel_input_error(exc, name_hint) from None

    return _run_in_session(run)


def _parse_models(value: str) -> dict[str, str | None]:
    """``krea-2-medium,krea-2-large=krea/krea-2/large`` -> {id: upstream id or None}."""
    models: dict[str, str | None] = {}
    for item in value.split(","):
        model_id, eq, upstream = (part.strip() for part in item.partition("="))
        if not model_id or (eq and not upstream):
            raise click.BadParameter(
                f"{item.strip()!r}: give MODEL or MODEL=UPSTREAM_MODEL, separated by commas",
                param_hint="'--models'",
            )
        if model_id in models:
            raise click.BadParameter(f"{model_id}: given twice", param_hint="'--models'")
        models[model_id] = upstream if eq else None
    return models


def _read_api_key(env_var: str | None, from_stdin: bool, plain: str | None) -> str | None:
    """The upstream key from the environment variable named, or from stdin; None if neither.

    No message here quotes what was given: it may be a key put where a name belongs.
    """
    if plain is not None:
        raise click.UsageError(
            "--api-key is not accepted: a key on the command line lands in shell history and "
            "in `ps`. Use --api-key-env VAR (the name of an environment variable holding it) "
            "or --api-key-stdin."
        )
    if env_var is not None and from_stdin:
        raise click.UsageError("give --api-key-env or --api-key-stdin, not both")
    if env_var is not None:
        if not _ENV_VAR_NAME.fullmatch(env_var):
            raise click.BadParameter(
                "give the name of an environment variable that holds the key, not the key",
                param_hint="'--api-key-env'",
            )
        value = os.environ.get(env_var, "").strip()
        if not value:
            raise click.BadParameter(
                "the environment variable it names is not set or is empty",
                param_hint="'--api-key-env'",
            )
        return value
    if from_stdin:
        if sys.stdin.isatty():
            value = str(click.prompt("Upstream API key", hide_input=True, err=True))
        else:
            value = sys.stdin.read()
        value = value.strip()
        if not value:
            raise click.BadParameter(
                "nothing was read from standard input", param_hint="'--api-key-stdin'"
            )
        return value
    return None


def _channel_options(*, adding: bool) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The options ``channels add`` and ``channels update`` share; ``add`` requires some."""
    from gateway.channels.models import Channel

    def default(field: str) -> str:
        # On update, an option left out leaves the field as it is.
        if not adding:
            return ""
        value = Channel.model_fields[field].default
        return f" [default: {str(value).lower() if isinstance(value, bool) else value}]"

    options = [
        click.option(
            "--adapter",
            required=adding,
            type=click.Choice(ADAPTER_NAMES),
            help="The upstream's wire protocol.",
        ),
        click.option(
            "--base-url", required=adding, help="The upstream API's URL, e.g. https://api.krea.ai"
        ),
        click.option(
            "--models",
            required=adding,
            help="Catalogue models it serves, comma-separated; MODEL=UPSTREAM_ID where the "
            "upstream's id for it differs from the catalogue's."
            + ("" if adding else " Replaces the whole list."),
        ),
        click.option(
            "--priority", type=int, help="-1000..1000; higher is tried first." + default("priority")
        ),
        click.option(
            "--weight",
            type=int,
            help="1..1000; its share of tasks among equal priorities." + default("weight"),
        ),
        click.option(
            "--max-concurrency",
            type=int,
            help="Upstream jobs at once on this account, all workers together."
            + default("max_concurrency"),
        ),
        click.option(
            "--enabled/--disabled",
            default=None,
            help="Route tasks to it, or not." + default("enabled"),
        ),
        click.option(
            "--api-key-env",
            metavar="VAR",
            help="Name of an environment variable holding the upstream key.",
        ),
        click.option(
            "--api-key-stdin", is_flag=True, help="Read the upstream key from standard input."
        ),
        click.option("--api-key", "api_key_plain", hidden=True),
    ]
    if not adding:
        options.append(click.option("--name", help="A new name."))

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _channel_fields(
    *,
    api_key_env: str | None,
    api_key_stdin: bool,
    api_key_plain: str | None,
    models: str | None,
    **given: Any,
) -> dict[str, Any]:
    """The service's fields from the options given (those not given are left out)."""
    fields = {name: value for name, value in given.items() if value is not None}
    if models is not None:
        fields["models"] = _parse_models(models)
    api_key = _read_api_key(api_key_env, api_key_stdin, api_key_plain)
    if api_key is not None:
        fields["api_key"] = api_key
    return fields


@channels.command("add")
@click.argument("name")
@_channel_options(adding=True)
def channels_add(name: str, **options: Any) -> None:
    """Add channel NAME; its key comes from --api-key-env VAR or --api-key-stdin.

    \b
    KEY=... tollgate channels add krea-backup --adapter krea \\
        --base-url https://api.krea.ai --api-key-env KEY \\
        --models 'krea-2-medium,krea-2-large=krea/krea-2/large' --priority -1
    """
    from gateway.channels.service import channel_view, create_channel

    fields = {"name": name, **_channel_fields(**options)}
    if "api_key" not in fields:
        raise click.UsageError(
            "the upstream key is required: --api-key-env VAR (the name of an environment "
            "variable holding it) or --api-key-stdin"
        )

    async def run(session: AsyncSession, catalog: Catalog) -> dict[str, Any]:
        return channel_view(await create_channel(session, fields, catalog))

    _emit(_run_channel_command(run, name_hint="'NAME'"))


@channels.command("list")
def channels_list() -> None:
    """List channels, highest priority first (keys are never shown)."""
    from gateway.channels.service import channel_view, list_channels

    async def run(session: AsyncSession, catalog: Catalog) -> list[dict[str, Any]]:
        return [channel_view(c) for c in await list_channels(session)]

    _emit(_run_channel_command(run))


@channels.command("show")
@click.argument("ref")
def channels_show(ref: str) -> None:
    """Show channel REF (id or name)."""
    from gateway.channels.service import channel_view, get_channel

    async def run(session: AsyncSession, catalog: Catalog) -> dict[str, Any]:
        return channel_view(await get_channel(session, ref))

    _emit(_run_channel_command(run))


@channels.command("update")
@click.argument("ref")
@_channel_options(adding=False)
def channels_update(ref: str, **options: Any) -> None:
    """Change channel REF (id or name): only the options given change."""
    from gateway.channels.service import channel_view, update_channel

    fields = _channel_fields(**options)
    if not fields:
        raise click.UsageError("nothing to change: give at least one option (see --help)")

    async def run(session: AsyncSession, catalog: Catalog) -> dict[str, Any]:
        return channel_view(await update_channel(session, ref, fields, catalog))

    _emit(_run_channel_command(run))


def _set_enabled(ref: str, enabled: bool) -> None:
    from gateway.channels.service import channel_view, update_channel

    async def run(session: AsyncSession, catalog: Catalog) -> dict[str, Any]:
        return channel_view(await update_channel(session, ref, {"enabled": enabled}, catalog))

    _emit(_run_channel_command(run))


@channels.command("enable")
@click.argument("ref")
def channels_enable(ref: str) -> None:
    """Route tasks to channel REF again."""
    _set_enabled(ref, True)


@channels.command("disable")
@click.argument("ref")
def channels_disable(ref: str) -> None:
    """Stop routing new tasks to channel REF (it stays, with its key)."""
    _set_enabled(ref, False)


@channels.command("remove")
@click.argument("ref")
def channels_remove(ref: str) -> None:
    """Remove channel REF and its key."""
    from gateway.channels.service import delete_channel, get_channel

    async def run(session: AsyncSession, catalog: Catalog) -> dict[str, Any]:
        channel = await get_channel(session, ref)
        removed = {"id": channel.id, "name": channel.name, "removed": True}
        await delete_channel(session, channel.id)
        return removed

    _emit(_run_channel_command(run))


if __name__ == "__main__":
    sys.exit(main())
