"""The object store interface and the key rules every backend shares."""

from __future__ import annotations

import abc
import asyncio
import builtins
import hashlib
import re
from pathlib import Path

from shipyard_core.errors import InvalidArgument

# S3's own limit; the file backend keeps it too so a key valid here is valid everywhere.
MAX_KEY_BYTES = 1024
_CHUNK = 1 << 20
# Control characters break listings, logs and some S3 servers; keys are names, not data.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The file backend keeps its temporary files under this top-level folder of the root.
RESERVED_PREFIX = ".shipyard-tmp"


def validate_key(key: str, *, field: str = "key") -> str:
    """Checks that ``key`` is a safe, portable object key and returns it.

    A key is a ``/``-separated path: no leading ``/``, no empty, ``.`` or ``..`` segment,
    no trailing ``/``, no backslash or control character, at most 1024 bytes. The same
    rules on every backend mean a key that works on ``file://`` works on ``s3://``.
    """
    fix = "use a relative path such as 'images/iris/source.tar.gz'"
    if not isinstance(key, str) or not key:
        raise InvalidArgument(field, "must be a non-empty string", fix)
    if key.startswith("/"):
        raise InvalidArgument(field, f"{key!r} starts with '/'", fix)
    if key.endswith("/"):
        raise InvalidArgument(field, f"{key!r} ends with '/' (that names a folder)", fix)
    if "\\" in key or _CONTROL.search(key):
        raise InvalidArgument(field, f"{key!r} holds a backslash or a control character", fix)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidArgument(field, f"is {len(key.encode())} bytes, over {MAX_KEY_BYTES}", fix)
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidArgument(field, f"{key!r} has an empty, '.' or '..' segment", fix)
    if key.split("/", 1)[0] == RESERVED_PREFIX:
        raise InvalidArgument(field, f"{key!r} is under the reserved {RESERVED_PREFIX}/", fix)
    return key


def validate_prefix(prefix: str, *, field: str = "prefix") -> str:
    """Checks a listing prefix: empty (everything) or a key-like string (may end in ``/``)."""
    if prefix == "":
        return prefix
    body = prefix[:-1] if prefix.endswith("/") else prefix
    # A prefix is a partial key: 'images/ir' is fine, so only the key rules apply to it.
    validate_key(body, field=field)
    return prefix


def sha256_file(path: Path) -> tuple[str, int]:
    """Returns the hex sha256 and the size of a file, reading it in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class ObjectStore(abc.ABC):
    """A flat namespace of byte objects under ``/``-separated keys.

    Every method validates its key (``InvalidArgument``); reading, stat-less checks and
    deletion of a missing key raise ``NotFound``. Implementations never block the event
    loop: blocking I/O runs in a worker thread.
    """

    @abc.abstractmethod
    async def put_bytes(self, key: str, data: bytes) -> None:
        """Stores ``data`` under ``key``, replacing any object there, all or nothing."""

    @abc.abstractmethod
    async def put_file(self, key: str, path: Path) -> int:
        """Streams the file at ``path`` to ``key`` (multipart when large); returns its size."""

    @abc.abstractmethod
    async def get_bytes(self, key: str) -> bytes:
        """Returns the object's bytes; ``NotFound`` when there is none."""

    @abc.abstractmethod
    async def get_file(self, key: str, path: Path) -> int:
        """Streams the object to ``path`` (written whole or not at all); returns its size."""

    @abc.abstractmethod
    async def stat(self, key: str) -> int | None:
        """Returns the object's size in bytes, or None when there is no such object."""

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> builtins.list[str]:
        """Returns every key that starts with ``prefix`` (a plain string prefix, as in S3),
        sorted; all pages are read."""

    @abc.abstractmethod
    async def delete(self, key: str, *, missing_ok: bool = False) -> None:
        """Deletes the object; ``NotFound`` when there is none, unless ``missing_ok``."""

    @abc.abstractmethod
    def url(self, key: str) -> str:
        """Returns the object's URL (``file:///...`` or ``s3://bucket/...``) for logs and users."""

    async def exists(self, key: str) -> bool:
        """Tells whether an object is stored under ``key``."""
        return await self.stat(key) is not None

    async def put_content_addressed(self, path: Path, prefix: str) -> tuple[str, str, int]:
        """Stores the file under ``<prefix>/sha256/<hex digest>`` and returns
        ``(digest, key, size)``.

        The upload is skipped when an object of the same size is already there: the key
        is the content's hash, so an object under it is that content (a partial object
        cannot exist, as puts are all or nothing).
        """
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix, field="prefix")
        digest, size = await asyncio.to_thread(sha256_file, path)
        key = f"{prefix}/sha256/{digest}" if prefix else f"sha256/{digest}"
        if await self.stat(key) != size:
            await self.put_file(key, path)
        return digest, key, size
