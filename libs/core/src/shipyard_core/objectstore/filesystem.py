"""``file://`` object store: one file per key under a root folder (the embedded default)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from shipyard_core.errors import FailedPrecondition, NotFound
from shipyard_core.objectstore.base import (
    RESERVED_PREFIX,
    ObjectStore,
    validate_key,
    validate_prefix,
)

_CHUNK = 1 << 20


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding the new name is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_stream(src: BinaryIO, dst: BinaryIO) -> int:
    size = 0
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        size += len(chunk)
    return size


def _write_atomically(
    target: Path, tmp_dir: Path, write: Callable[[BinaryIO], int], *, durable: bool
) -> int:
    """Writes through a temporary file in ``tmp_dir`` (same file system as ``target``) and
    renames it into place, so readers see the old object or the whole new one, never a
    part. With ``durable``, data and rename are fsync'd before returning."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=".part-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            size = write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
            # mkstemp creates 0600; objects are ordinary readable files.
            os.fchmod(f.fileno(), 0o644)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
        if durable:
            _fsync_dir(target.parent)
        return size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


class FileStore(ObjectStore):
    """Objects as files under ``root``: key ``a/b/c`` is the file ``root/a/b/c``.

    Writes are atomic (temporary file + rename) and fsync'd. Temporary files live under
    ``root/.shipyard-tmp/``, a name keys may not use. Because keys are files and folders,
    ``a`` and ``a/b`` cannot both exist here (S3 allows it); such a put is refused with
    ``FailedPrecondition``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / RESERVED_PREFIX

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _conflict(self, key: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"key {key!r} clashes with another key in the file object store at {self.root}: "
            "in a file store a key cannot also be a folder of other keys (e.g. 'a' and 'a/b'); "
            "choose another key or delete the other one"
        )

    def _not_found(self, key: str) -> NotFound:
        return NotFound(f"object {key!r} not found in the object store {self.root.as_uri()}")

    async def put_bytes(self, key: str, data: bytes) -> None:
        """Stores ``data`` under ``key`` atomically and durably."""
        target = self._path(key)

        def write(f: BinaryIO) -> int:
            f.write(data)
            return len(data)

        try:
            await asyncio.to_thread(_write_atomically, target, self._tmp, write, durable=True)
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            raise self._conflict(key) from exc

    async def put_file(self, key: str, path: Path) -> int:
        """Copies the file at ``path`` to ``key`` in 1 MiB chunks, atomically and durably."""
        target = self._path(key)

        def copy() -> int:
            with path.open("rb") as src:
                return _write_atomically(
                    target, self._tmp, lambda dst: _copy_stream(src, dst), durable=True
                )

        try:
            return await asyncio.to_thread(copy)
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            raise self._conflict(key) from exc

    async def get_bytes(self, key: str) -> bytes:
        """Returns the object's bytes (``NotFound`` when missing)."""
        target = self._path(key)
        try:
            return await asyncio.to_thread(target.read_bytes)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise self._not_found(key) from exc

    async def get_file(self, key: str, path: Path) -> int:
        """Copies the object to ``path`` through a temporary file beside it."""
        source = self._path(key)

        def copy() -> int:
            with source.open("rb") as src:
                # The destination is the caller's scratch space: atomic, but not fsync'd.
                return _write_atomically(
                    path, path.parent, lambda dst: _copy_stream(src, dst), durable=False
                )

        try:
            return await asyncio.to_thread(copy)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            if not source.is_file():
                raise self._not_found(key) from exc
            raise

    async def stat(self, key: str) -> int | None:
        """Returns the object's size, or None when missing."""
        target = self._path(key)

        def size() -> int | None:
            try:
                st = target.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            return st.st_size if target.is_file() else None

        return await asyncio.to_thread(size)

    async def list(self, prefix: str = "") -> builtins.list[str]:
        """Returns the sorted keys starting with ``prefix`` (a string prefix, as in S3)."""
        validate_prefix(prefix)
        # Only the folder named by the prefix up to its last '/' can hold matches.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""

        def walk() -> builtins.list[str]:
            start = self.root / folder if folder else self.root
            keys: builtins.list[str] = []
            for dirpath, dirnames, filenames in os.walk(start):
                rel_dir = Path(dirpath).relative_to(self.root).as_posix()
                if rel_dir == ".":
                    rel_dir = ""
                    dirnames[:] = [d for d in dirnames if d != RESERVED_PREFIX]
                for name in filenames:
                    key = f"{rel_dir}/{name}" if rel_dir else name
                    if key.startswith(prefix):
                        keys.append(key)
            keys.sort()
            return keys

        return await asyncio.to_thread(walk)

    async def delete(self, key: str, *, missing_ok: bool = False) -> None:
        """Deletes the object and the folders it leaves empty."""
        target = self._path(key)

        def remove() -> bool:
            try:
                target.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return False
            # Prune emptied folders so the key space stays as S3 would show it
            # (and a later put of the folder's name as a key works).
            parent = target.parent
            while parent != self.root:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
            return True

        if not await asyncio.to_thread(remove) and not missing_ok:
            raise self._not_found(key)

    def url(self, key: str) -> str:
        """``file:///<root>/<key>``."""
        return self._path(key).as_uri()
