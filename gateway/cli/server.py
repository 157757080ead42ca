"""``tollgate migrate`` and ``tollgate serve``: the schema, and the HTTP gateway."""

import asyncio
import signal

import click
from alembic import command

from gateway import server
from gateway.cli.common import settings_or_exit
from gateway.db import DatabaseNotReady, alembic_config, check_migrated, create_engine
from gateway.logs import configure_logging


@click.command()
def migrate() -> None:
    """Bring the database schema to the latest revision (alembic upgrade head)."""
    command.upgrade(alembic_config(settings_or_exit().database_url), "head")
    click.echo("database is at the latest revision", err=True)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="Gateway processes.")
def serve(host: str, port: int, workers: int) -> None:
    """Run the HTTP gateway.

    On SIGTERM it stops accepting connections, lets the requests in flight finish
    (for at most TOLLGATE_SHUTDOWN_GRACE_SECONDS) and exits 0.
    """
    loaded = settings_or_exit()
    configure_logging(loaded)

    async def preflight() -> None:
        engine = create_engine(loaded)
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
        log_level=loaded.log_level.lower(),
        shutdown_grace_seconds=loaded.shutdown_grace_seconds,
    )


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)
