"""encrypt webhook signing secrets and channels' upstream API keys at rest

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 15:00:00

Widens both columns for their ciphertext, then seals every row that is not sealed
yet with the first key of ``TOLLGATE_ENCRYPTION_KEYS`` (gateway/crypto.py), read
from the migrating process's environment: the same variable the gateway and the
workers are given. A database with rows to seal and no keys stops here with a
message saying so; an empty one (a fresh install) needs none. Downgrading opens
every row again with the same keys.
"""

import os
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

from gateway.crypto import CHANNEL_API_KEY, WEBHOOK_SECRET, Keyring, is_sealed

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column, the name its ciphertext is bound to, old length, new length)
COLUMNS = (
    ("tenants", "webhook_secret", WEBHOOK_SECRET, 100, 400),
    ("channels", "api_key", CHANNEL_API_KEY, 4096, 8192),
)


def _keyring(needed_for: str) -> Keyring:
    spec = os.environ.get("TOLLGATE_ENCRYPTION_KEYS", "")
    if not spec.strip():
        raise SystemExit(
            f"migration 0007: {needed_for}, and TOLLGATE_ENCRYPTION_KEYS is not set: "
            "set it as for the gateway (docs/operations.md, 'Secrets at rest') and run "
            "`tollgate migrate` again"
        )
    try:
        return Keyring.parse(spec)
    except ValueError as exc:
        raise SystemExit(f"migration 0007: TOLLGATE_ENCRYPTION_KEYS: {exc}") from None


def _rows(table: str, column: str) -> list[tuple[str, str]]:
    query = sa.text(f"SELECT id, {column} FROM {table} ORDER BY id FOR UPDATE")
    return [(row[0], row[1]) for row in op.get_bind().execute(query)]


def _write(table: str, column: str, row_id: str, value: str) -> None:
    op.get_bind().execute(
        sa.text(f"UPDATE {table} SET {column} = :value WHERE id = :id"),
        {"value": value, "id": row_id},
    )


def upgrade() -> None:
    keyring: Keyring | None = None
    for table, column, bound_to, _, new_length in COLUMNS:
        op.alter_column(
            table,
            column,
            type_=sqlmodel.sql.sqltypes.AutoString(length=new_length),
            existing_nullable=False,
        )
        for row_id, value in _rows(table, column):
            if is_sealed(value):
                continue
            keyring = keyring or _keyring(f"{table}.{column} holds secrets to encrypt")
            _write(table, column, row_id, keyring.seal(value, bound_to))


def downgrade() -> None:
    keyring: Keyring | None = None
    for table, column, bound_to, old_length, _ in COLUMNS:
        for row_id, value in _rows(table, column):
            if not is_sealed(value):
                continue
            keyring = keyring or _keyring(f"{table}.{column} holds secrets to decrypt")
            _write(table, column, row_id, keyring.open(value, bound_to))
        op.alter_column(
            table,
            column,
            type_=sqlmodel.sql.sqltypes.AutoString(length=old_length),
            existing_nullable=False,
        )
