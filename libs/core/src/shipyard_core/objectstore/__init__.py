"""Object store: model sources and environment packs for image builds, S3 prefixes for
batch jobs.

``open_store(url)`` takes the ``SHIPYARD_OBJECT_STORE`` setting:

- ``file:///absolute/path``: one file per key under that folder (the embedded default);
  writes are atomic (temporary file + rename) and fsync'd.
- ``s3://bucket[/prefix]``: through boto3, against AWS or any S3-compatible server; the
  endpoint comes from ``SHIPYARD_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL``), credentials the
  standard boto3 way.

Every backend has the same async API (:class:`ObjectStore`) and the same key rules
(:func:`validate_key`); a missing key raises ``NotFound``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shipyard_core.errors import InvalidArgument
from shipyard_core.objectstore.base import ObjectStore, sha256_file, validate_key, validate_prefix
from shipyard_core.objectstore.filesystem import FileStore

__all__ = [
    "FileStore",
    "ObjectStore",
    "open_store",
    "s3_endpoint_from_env",
    "sha256_file",
    "validate_key",
    "validate_prefix",
]

SETTING = "SHIPYARD_OBJECT_STORE"
_FORMS = "use file:///absolute/path or s3://bucket[/prefix]"
# S3's bucket naming rules (the portable subset: no uppercase, no underscores).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def s3_endpoint_from_env() -> str | None:
    """The S3 endpoint URL from ``SHIPYARD_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL``, else
    None (AWS itself)."""
    return os.environ.get("SHIPYARD_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


def open_store(url: str, *, endpoint_url: str | None = None) -> ObjectStore:
    """Opens the object store named by ``url`` (the ``SHIPYARD_OBJECT_STORE`` setting).

    ``endpoint_url`` overrides the S3 endpoint from the environment. A URL of another
    form raises ``InvalidArgument`` naming the setting and the accepted forms. Opening
    does no I/O besides creating a ``file://`` root folder.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        # file:///abs and file://localhost/abs are the absolute forms; file://x/y would
        # silently drop the host, and file:relative has no fixed meaning.
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidArgument(SETTING, f"{url!r} is not an absolute file:// URL", _FORMS)
        if parts.query or parts.fragment:
            raise InvalidArgument(SETTING, f"{url!r} has a query or fragment", _FORMS)
        root = Path(unquote(parts.path))
        if ".." in root.parts:
            raise InvalidArgument(SETTING, f"{url!r} contains '..'", _FORMS)
        root.mkdir(parents=True, exist_ok=True)
        return FileStore(root)
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise InvalidArgument(
                SETTING,
                f"{url!r} does not name a valid bucket ({bucket!r})",
                "use s3://bucket[/prefix] with a bucket of 3-63 lowercase letters, digits, "
                "'.' and '-'",
            )
        if parts.query or parts.fragment:
            raise InvalidArgument(SETTING, f"{url!r} has a query or fragment", _FORMS)
        prefix = unquote(parts.path).strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    SETTING, f"{url!r} has an invalid prefix: {exc.message}", _FORMS
                ) from exc
        # Imported here: boto3 takes a noticeable time to import, and the file store
        # (the default) does not need it.
        from shipyard_core.objectstore.s3 import S3Store

        return S3Store(bucket, prefix, endpoint_url=endpoint_url or s3_endpoint_from_env())
    raise InvalidArgument(SETTING, f"{url!r} is not a supported object store URL", _FORMS)
