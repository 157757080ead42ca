"""``LocalStorage``: results in a directory shared by gateways and workers (one host or a
POSIX shared volume). Files are written to a temporary name and renamed into place."""

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from gateway.storage.base import Deleted, StorageUnavailable, StoredObject, check_key, check_task_id

CHUNK_BYTES = 256 * 1024


class LocalStorage:
    backend = "file"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file, and a job that
        # runs twice simply replaces the same key with the same bytes.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    async def put(self, key: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._write, key, data)
        except OSError as exc:
            # A full disk or a lost mount: the storing step retries, like any unreachable store.
            raise StorageUnavailable(f"cannot write {key}: {exc.strerror or exc}") from exc

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._read, key)

    async def open(self, key: str) -> StoredObject | None:
        try:
            handle = await asyncio.to_thread(self._path(key).open, "rb")
        except FileNotFoundError:
            return None
        # The open file keeps its bytes even if retention unlinks it meanwhile.
        size = os.fstat(handle.fileno()).st_size
        return StoredObject(size=size, chunks=_chunks(handle))

    def _delete_task(self, task_id: str) -> Deleted:
        folder = self.root / check_task_id(task_id)
        files = size = 0
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return Deleted()
        for entry in entries:
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".tmp-"):
                size += entry.stat(follow_symlinks=False).st_size
                files += 1
        # Leftover temporary files of a crashed write go too; they were never results.
        shutil.rmtree(folder, ignore_errors=True)
        return Deleted(files=files, bytes=size)

    async def delete_task(self, task_id: str) -> Deleted:
        try:
            return await asyncio.to_thread(self._delete_task, task_id)
        except OSError as exc:
            raise StorageUnavailable(f"cannot delete {task_id}/: {exc.strerror or exc}") from exc

    def _check(self) -> None:
        if not self.root.is_dir():
            # A fresh deployment: the first write creates it.
            self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StorageUnavailable(f"{self.root} is not readable")

    async def check(self) -> None:
        try:
            await asyncio.to_thread(self._check)
        except OSError as exc:
            raise StorageUnavailable(f"{self.root}: {exc.strerror or exc}") from exc

    async def close(self) -> None:
        return None


async def _chunks(handle: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            yield chunk
    finally:
        handle.close()
