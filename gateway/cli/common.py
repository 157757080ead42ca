"""What every command shares: the settings, JSON output, one committed transaction."""

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import click
import msgspec
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db import DatabaseNotReady, check_migrated, create_engine, session_factory, transaction
from gateway.errors import ApiError
from gateway.settings import Settings, SettingsError, load_settings

T = TypeVar("T")


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


# Credits print as exact JSON numbers, as in the admin API.
_encoder = msgspec.json.Encoder(decimal_format="number", enc_hook=str)


def emit(value: Any) -> None:
    click.echo(msgspec.json.format(_encoder.encode(value), indent=2).decode())


def run_in_session(fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run ``fn`` in one committed transaction against a migrated database."""

    async def main() -> T:
        engine = create_engine(settings_or_exit())
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


def aware_time(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 time with its offset (``2027-01-01T00:00:00Z``), or a usage error."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time", param_hint=option) from None
    if moment.tzinfo is None:
        raise click.BadParameter(
            "give a time zone offset, e.g. 2027-01-01T00:00:00Z", param_hint=option
        )
    return moment
