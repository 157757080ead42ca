"""Secrets at rest: tenants' webhook signing secrets and channels' upstream API keys.

Rules:
- Both columns hold AES-256-GCM ciphertext, never the secret: a database dump
  (or a backup, or a replica) lets no one forge a tenant's callbacks or spend
  the reseller's upstream accounts.
- Keys come from ``TOLLGATE_ENCRYPTION_KEYS``: ``id:key[,id:key…]``, each key
  32 random bytes in URL-safe base64 (``tollgate secrets new-key`` prints
  one). The **first** key encrypts; every key listed decrypts, so a key is
  rotated by putting a new one first, running ``tollgate secrets reencrypt``
  (``reencrypt`` below), then dropping the old one.
- A stored value is ``enc:v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>``:
  the key id says which key opens it. The nonce is 12 random bytes per value.
  The associated data is the column's name (``tenants.webhook_secret``), so a
  value copied into the other column does not open.
- Encryption is in the column type (``Sealed``), so every ORM and Core read or
  write of the column goes through it. The type finds the keys on the engine's
  dialect, put there by ``gateway.db.create_engine(settings)``: no module-level
  state, and an engine without keys refuses to read or write a sealed column.
- A value without the ``enc:`` prefix is one written before encryption (or by
  an older process during a rolling upgrade): it is read as it is, and
  ``reencrypt`` seals it. Migration 0007 seals every existing row.
"""

import base64
import binascii
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

PREFIX: Final = "enc:v1:"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")

# The sealed columns, by the name their ciphertext is bound to.
WEBHOOK_SECRET: Final = "tenants.webhook_secret"
CHANNEL_API_KEY: Final = "channels.api_key"
SEALED_COLUMNS: Final = (WEBHOOK_SECRET, CHANNEL_API_KEY)

# Where the engine's dialect carries its keyring (gateway/db.py puts it there).
DIALECT_ATTRIBUTE: Final = "tollgate_keyring"


class KeyringError(ValueError):
    """The keys are missing or malformed, or a value cannot be opened with them."""


def new_key() -> str:
    """A fresh key, as it is written in ``TOLLGATE_ENCRYPTION_KEYS``."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def _b64decode(text: str) -> bytes:
    """URL-safe base64, padding optional, any other character refused."""
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


@dataclass(frozen=True)
class Keyring:
    """The keys that open sealed values; the first one seals."""

    keys: tuple[tuple[str, AESGCM], ...]

    @classmethod
    def parse(cls, spec: str) -> "Keyring":
        """``id:key[,id:key…]`` (``TOLLGATE_ENCRYPTION_KEYS``), or KeyringError saying why."""
        keys: list[tuple[str, AESGCM]] = []
        for position, item in enumerate(p.strip() for p in spec.split(",") if p.strip()):
            key_id, sep, encoded = item.partition(":")
            if not sep or not _KEY_ID.match(key_id):
                raise KeyringError(
                    f"key {position + 1}: expected id:key, the id made of letters, digits, "
                    "'_', '.', '-' (at most 32)"
                )
            if any(key_id == known for known, _ in keys):
                raise KeyringError(f"key {key_id!r} is listed twice")
            try:
                raw = _b64decode(encoded.strip())
            except (binascii.Error, ValueError):
                raise KeyringError(f"key {key_id!r}: not URL-safe base64") from None
            if len(raw) != KEY_BYTES:
                raise KeyringError(
                    f"key {key_id!r}: must be {KEY_BYTES} bytes (is {len(raw)}); make one with "
                    "`tollgate secrets new-key`"
                )
            keys.append((key_id, AESGCM(raw)))
        if not keys:
            raise KeyringError("no key given")
        return cls(tuple(keys))

    @property
    def current_id(self) -> str:
        return self.keys[0][0]

    def seal(self, plaintext: str, column: str) -> str:
        key_id, aead = self.keys[0]
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = aead.encrypt(nonce, plaintext.encode(), column.encode())
        return f"{PREFIX}{key_id}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, stored: str, column: str) -> str:
        if not is_sealed(stored):
            return stored  # written before encryption; reencrypt() seals it
        key_id, _, payload = stored[len(PREFIX) :].partition(":")
        aead = dict(self.keys).get(key_id)
        if aead is None:
            raise KeyringError(
                f"{column}: sealed with key {key_id!r}, which TOLLGATE_ENCRYPTION_KEYS "
                "does not list"
            )
        try:
            raw = _b64decode(payload)
            return aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], column.encode()).decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise KeyringError(
                f"{column}: a value sealed with key {key_id!r} does not open"
            ) from None


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX)


def sealed_key_id(stored: str) -> str | None:
    """The id of the key a stored value is sealed with (None: not sealed)."""
    if not is_sealed(stored):
        return None
    return stored[len(PREFIX) :].partition(":")[0]


def attach(dialect: Dialect, keyring: Keyring | None) -> None:
    setattr(dialect, DIALECT_ATTRIBUTE, keyring)


def _keyring(dialect: Dialect, column: str) -> Keyring:
    keyring: Keyring | None = getattr(dialect, DIALECT_ATTRIBUTE, None)
    if keyring is None:
        raise KeyringError(
            f"{column} is encrypted, and this engine has no keys: "
            "set TOLLGATE_ENCRYPTION_KEYS (docs/operations.md)"
        )
    return keyring


def open_sealed(dialect: Dialect, column: str, value: str | None) -> str | None:
    """A sealed column's value read without SQLAlchemy (a statement sent to the driver),
    opened as ``Sealed`` opens it."""
    return None if value is None else _keyring(dialect, column).open(value, column)


class Sealed(sa.types.TypeDecorator[str]):
    """A text column that stores its values sealed (see the module's rules)."""

    impl = sa.String
    cache_ok = True

    def __init__(self, column: str, length: int) -> None:
        super().__init__(length)
        self.column = column

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return _keyring(dialect, self.column).seal(value, self.column)

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        return open_sealed(dialect, self.column, None if value is None else str(value))


# Where each sealed column lives: name bound to -> (table, column).
_LOCATIONS: Final = {
    WEBHOOK_SECRET: ("tenants", "webhook_secret"),
    CHANNEL_API_KEY: ("channels", "api_key"),
}


async def reencrypt(conn: AsyncConnection, keyring: Keyring, *, batch: int = 500) -> dict[str, int]:
    """Seal every value not sealed with the keyring's first key under it; per column, how many.

    Reads and writes the stored text itself (not through ``Sealed``), a batch of rows
    at a time, each row locked; a row changed meanwhile is left for the next run.
    The caller commits.
    """
    changed: dict[str, int] = {}
    current = f"{PREFIX}{keyring.current_id}:"
    for bound_to, (table, column) in _LOCATIONS.items():
        done = 0
        last = ""
        while True:
            rows = (
                await conn.execute(
                    sa.text(
                        f"SELECT id, {column} FROM {table} "
                        f"WHERE id > :last AND NOT starts_with({column}, :current) "
                        "ORDER BY id LIMIT :batch FOR UPDATE SKIP LOCKED"
                    ),
                    {"last": last, "current": current, "batch": batch},
                )
            ).all()
            if not rows:
                break
            for row_id, stored in rows:
                value = keyring.seal(keyring.open(stored, bound_to), bound_to)
                await conn.execute(
                    sa.text(f"UPDATE {table} SET {column} = :value WHERE id = :id"),
                    {"value": value, "id": row_id},
                )
                done += 1
            last = rows[-1][0]
        changed[bound_to] = done
    return changed
