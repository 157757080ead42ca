"""The storage seam: what a result store must do, and the rules every backend keeps.

Rules:
- Keys are ``<task id>/<index>.<ext>`` (``check_key``); nothing else is stored,
  so a task's files are exactly the objects under ``<task id>/``.
- ``put`` replaces the whole object or leaves the old one: a reader never sees
  half an image, and a job that runs twice writes the same key twice.
- A missing object is ``None`` (``open``) or nothing to count (``delete_task``),
  never an error; a store that cannot be reached, refuses us or times out raises
  ``StorageUnavailable``, and only that.

Exceptions::

    StorageUnavailable      the store did not do what was asked; retry later
"""

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_KEY = re.compile(r"^[A-Za-z0-9_\-]+/[0-9]+\.(png|jpg|webp)$")
_TASK_ID = re.compile(r"^[A-Za-z0-9_\-]+$")


class StorageUnavailable(Exception):
    """The store could not be reached, refused the request or did not answer in time."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object being read: its size, and its bytes as they arrive."""

    size: int
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True, slots=True)
class Deleted:
    files: int = 0
    bytes: int = 0


class Storage(Protocol):
    # "file" or "s3": the label of the storage metrics and the readiness check.
    backend: str

    async def put(self, key: str, data: bytes) -> None: ...

    async def open(self, key: str) -> StoredObject | None:
        """The object, streamed; None if there is none (the stream starts at once)."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def delete_task(self, task_id: str) -> Deleted:
        """Delete every object of a task (``<task id>/…``); what was there."""
        ...

    async def check(self) -> None:
        """Raise StorageUnavailable unless the store answers and lets us list it."""
        ...

    async def close(self) -> None: ...


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"not a storage key: {key!r}")
    return key


def check_task_id(task_id: str) -> str:
    if not _TASK_ID.match(task_id):
        raise ValueError(f"not a task id: {task_id!r}")
    return task_id
