"""``tollgate secrets``: keys for secrets at rest, and re-encrypting under the newest one."""

import click
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway import crypto
from gateway.cli.common import emit, run_in_session, settings_or_exit


@click.group()
def secrets() -> None:
    """Encryption keys of webhook secrets and upstream keys (TOLLGATE_ENCRYPTION_KEYS)."""


@secrets.command("new-key")
@click.option("--id", "key_id", default="k1", show_default=True, help="The key's id.")
def secrets_new_key(key_id: str) -> None:
    """Print a new key as ID:KEY, to put first in TOLLGATE_ENCRYPTION_KEYS."""
    spec = f"{key_id}:{crypto.new_key()}"
    try:
        crypto.Keyring.parse(spec)
    except crypto.KeyringError as exc:
        raise click.BadParameter(str(exc), param_hint="--id") from None
    click.echo(spec)


@secrets.command("reencrypt")
def secrets_reencrypt() -> None:
    """Encrypt every stored secret under the first key of TOLLGATE_ENCRYPTION_KEYS.

    Run after putting a new key first (every process restarted with it); then the
    old keys can be dropped. Safe to run again: values already under the first key
    are left alone.
    """
    keyring = crypto.Keyring.parse(settings_or_exit().encryption_keys)

    async def run(session: AsyncSession) -> dict[str, int]:
        return await crypto.reencrypt(await session.connection(), keyring)

    changed = run_in_session(run)
    emit({"key": keyring.current_id, "reencrypted": changed})
