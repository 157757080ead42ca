"""``tollgate channels``: add, list, change and remove channels (upstream accounts).

An upstream key is never an argument (shell history, ``ps``): ``--api-key-env VAR``
or ``--api-key-stdin``. The service names the field at fault; these commands
name the option that sets it (exit 2).
"""

import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.channels.models import ADAPTER_NAMES, Channel
from gateway.channels.service import (
    channel_view,
    create_channel,
    delete_channel,
    get_channel,
    list_channels,
    update_channel,
)
from gateway.cli.common import emit, run_in_session, settings_or_exit
from gateway.errors import InvalidRequest
from pricing.catalog import Catalog, load_catalog

T = TypeVar("T")

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
    "upstream_costs": "'--upstream-cost'",
}
_ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@click.group()
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
    catalog = load_catalog(settings_or_exit().catalog_path)

    async def run(session: AsyncSession) -> T:
        try:
            return await fn(session, catalog)
        except InvalidRequest as exc:
            raise _channel_input_error(exc, name_hint) from None

    return run_in_session(run)


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


def _parse_costs(values: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``flux-1-pro=USD:per_image:0.05`` -> {model: {currency, rule, amount}}."""
    costs: dict[str, dict[str, str]] = {}
    for value in values:
        model_id, eq, cost = value.partition("=")
        parts = cost.split(":")
        if not eq or not model_id or len(parts) != 3 or not all(parts):
            raise click.BadParameter(
                f"{value!r}: give MODEL=CURRENCY:RULE:AMOUNT", param_hint="'--upstream-cost'"
            )
        currency, rule, amount = parts
        costs[model_id] = {"currency": currency, "rule": rule, "amount": amount}
    return costs


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
        click.option(
            "--upstream-cost",
            "upstream_costs",
            multiple=True,
            metavar="MODEL=CURRENCY:RULE:AMOUNT",
            help="This account's own upstream cost of a model (e.g. "
            "flux-1-pro=USD:per_image:0.05); repeat per model."
            + ("" if adding else " Replaces them all."),
        ),
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
    upstream_costs: tuple[str, ...] = (),
    **given: Any,
) -> dict[str, Any]:
    """The service's fields from the options given (those not given are left out)."""
    fields = {name: value for name, value in given.items() if value is not None}
    if upstream_costs:
        fields["upstream_costs"] = _parse_costs(upstream_costs)
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
    fields = {"name": name, **_channel_fields(**options)}
    if "api_key" not in fields:
        raise click.UsageError(
            "the upstream key is required: --api-key-env VAR (the name of an environment "
            "variable holding it) or --api-key-stdin"
        )

    async def run(session: AsyncSession, catalog: Catalog) -> dict[str, Any]:
        return channel_view(await create_channel(session, fields, catalog))

    emit(_run_channel_command(run, name_hint="'NAME'"))


@channels.command("list")
def channels_list() -> None:
    """List channels, highest priority first (keys are never shown)."""

    async def run(session: AsyncSession, catalog: Catalog) -> list[dict[str, Any]]:
        return [channel_view(c) for c in await list_channels(session)]

    emit(_run_channel_command(run))


@channels.command("show")
@click.argument("ref")
def channels_show(ref: str) -> None:
    """Show channel REF (id or name)."""

    async def run(session: AsyncSession, catalog: Catalog) -> dict[str, Any]:
        return channel_view(await get_channel(session, ref))

    emit(_run_channel_command(run))


@channels.command("update")
@click.argument("ref")
@_channel_options(adding=False)
def channels_update(ref: str, **options: Any) -> None:
    """Change channel REF (id or name): only the options given change."""
    fields = _channel_fields(**options)
    if not fields:
        raise click.UsageError("nothing to change: give at least one option (see --help)")

    async def run(session: AsyncSession, catalog: Catalog) -> dict[str, Any]:
        return channel_view(await update_channel(session, ref, fields, catalog))

    emit(_run_channel_command(run))


def _set_enabled(ref: str, enabled: bool) -> None:
    async def run(session: AsyncSession, catalog: Catalog) -> dict[str, Any]:
        return channel_view(await update_channel(session, ref, {"enabled": enabled}, catalog))

    emit(_run_channel_command(run))


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

    async def run(session: AsyncSession, catalog: Catalog) -> dict[str, Any]:
        channel = await get_channel(session, ref)
        removed = {"id": channel.id, "name": channel.name, "removed": True}
        await delete_channel(session, channel.id)
        return removed

    emit(_run_channel_command(run))
