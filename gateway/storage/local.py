"""``LocalStorage``: results in a directory shared by gateways and workers (one host or a
POSIX shared volume). Files are written to a temporary name and renamed into place.

A write is a handful of system calls: the task's folder is made with one ``mkdir`` (all of its
parents only when the root is missing), the temporary file is opened under a name unique to this
process (a random token drawn once, and a counter: no ``mkstemp`` retry loop), written
unbuffered, and renamed into place.
"""

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from gateway.storage.base import Deleted, StorageUnavailable, StoredObject, check_key, check_task_id

CHUNK_BYTES = 256 * 1024
# Temporary names: unique to this process on any host sharing the volume.
_TMP_PREFIX = f".tmp-{secrets.token_hex(6)}-"
_tmp_numbers = itertools.count()
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class LocalStorage:
    backend = "file"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(self, key: str, data: bytes) -> None:
        path = os.path.join(self.root, check_key(key))
        folder = os.path.dirname(path)
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        except FileNotFoundError:  # the root itself is missing (a fresh deployment)
            os.makedirs(folder, exist_ok=True)
        # Write then rename: a reader never sees half a file, and a job that
        # runs twice simply replaces the same key with the same bytes.
        tmp = os.path.join(folder, f"{_TMP_PREFIX}{next(_tmp_numbers)}")
        fd = os.open(tmp, _TMP_FLAGS, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
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
