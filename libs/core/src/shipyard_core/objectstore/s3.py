"""``s3://bucket[/prefix]`` object store through boto3 (AWS S3 or any S3-compatible server)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from shipyard_core.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ShipyardError,
    Unavailable,
)
from shipyard_core.objectstore.base import ObjectStore, validate_key, validate_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")

_MISSING = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
# Multipart above 16 MiB in 16 MiB parts: packs are hundreds of MB, and a part is the
# unit a failed transfer retries.
_TRANSFER = TransferConfig(
    multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4
)


class S3Store(ObjectStore):
    """Objects in an S3 bucket, keys under an optional prefix of the bucket.

    Credentials come the standard boto3 way (environment, profile, instance role). With an
    ``endpoint_url`` (MinIO, moto, Ceph, ...) path-style addressing is used, which every
    S3-compatible server understands.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            # The default thread pool runs many requests at once (listing, dedup checks).
            max_pool_connections=32,
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        # A Session of its own: boto3's default session is not safe to share across threads.
        session = boto3.session.Session()
        self._client: S3Client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            config=config,
            # boto3 needs a region to sign; S3-compatible servers ignore it.
            region_name=session.region_name or "us-east-1",
        )

    def _at(self) -> str:
        return f" at {self.endpoint_url}" if self.endpoint_url else ""

    def _where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}{self._at()}"

    def _raise(self, exc: Exception, key: str | None) -> NoReturn:
        """Turns a boto3 failure into the Shipyard error a caller can act on."""
        what = f"object {key!r}" if key is not None else "listing"
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code == "NoSuchBucket":
                raise FailedPrecondition(
                    f"bucket {self.bucket!r} does not exist{self._at()}"
                    " (create it, or point SHIPYARD_OBJECT_STORE at an existing bucket)"
                ) from exc
            if code in _MISSING:
                raise NotFound(f"{what} not found in the object store {self._where()}") from exc
            if code in _DENIED:
                raise PermissionDenied(
                    f"the object store {self._where()} refused {what}: {code} (check the AWS "
                    "credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
                ) from exc
            message = error.get("Message", "")
            if status >= 500 or code in {"SlowDown", "ServiceUnavailable"}:
                raise Unavailable(
                    f"the object store {self._where()} failed on {what}: {code} {message} "
                    "(retry later)"
                ) from exc
            raise FailedPrecondition(
                f"the object store {self._where()} refused {what}: {code} {message}"
            ) from exc
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            raise FailedPrecondition(
                f"no AWS credentials for {self._where()} (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            ) from exc
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            raise Unavailable(
                f"cannot reach the object store {self._where()}: {exc} (check "
                "SHIPYARD_S3_ENDPOINT / AWS_ENDPOINT_URL and that the server is up)"
            ) from exc
        raise exc

    async def _call(self, key: str | None, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except ShipyardError:
            raise
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            self._raise(exc, key)

    async def put_bytes(self, key: str, data: bytes) -> None:
        """Stores ``data`` under ``key`` (one PUT: all or nothing)."""
        full = self.prefix + validate_key(key)
        await self._call(
            key, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data)
        )

    async def put_file(self, key: str, path: Path) -> int:
        """Streams the file to ``key``, multipart above 16 MiB."""
        full = self.prefix + validate_key(key)

        def upload() -> int:
            with path.open("rb") as f:
                # upload_fileobj (unlike upload_file) lets the ClientError through, so the
                # caller gets NoSuchBucket/AccessDenied rather than a generic failure.
                self._client.upload_fileobj(f, self.bucket, full, Config=_TRANSFER)
            return path.stat().st_size

        return await self._call(key, upload)

    async def get_bytes(self, key: str) -> bytes:
        """Returns the object's bytes (``NotFound`` when missing)."""
        full = self.prefix + validate_key(key)

        def get() -> bytes:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            return response["Body"].read()

        return await self._call(key, get)

    async def get_file(self, key: str, path: Path) -> int:
        """Streams the object to ``path`` through a temporary file beside it."""
        full = self.prefix + validate_key(key)

        def download() -> int:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.part-")
            try:
                with os.fdopen(fd, "wb") as f:
                    self._client.download_fileobj(self.bucket, full, f, Config=_TRANSFER)
                os.chmod(tmp_name, 0o644)
                os.replace(tmp_name, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
                raise
            return path.stat().st_size

        return await self._call(key, download)

    async def stat(self, key: str) -> int | None:
        """Returns the object's size (HEAD), or None when missing."""
        full = self.prefix + validate_key(key)
        try:
            head = await self._call(
                key, lambda: self._client.head_object(Bucket=self.bucket, Key=full)
            )
        except NotFound:
            return None
        return int(head["ContentLength"])

    async def list(self, prefix: str = "") -> builtins.list[str]:
        """Returns the sorted keys starting with ``prefix``, reading every page."""
        full = self.prefix + validate_prefix(prefix)

        def collect() -> builtins.list[str]:
            keys: builtins.list[str] = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
            keys.sort()
            return keys

        return await self._call(None, collect)

    async def delete(self, key: str, *, missing_ok: bool = False) -> None:
        """Deletes the object (S3's DELETE succeeds on a missing key, so a HEAD tells)."""
        full = self.prefix + validate_key(key)
        if not missing_ok and await self.stat(key) is None:
            raise NotFound(f"object {key!r} not found in the object store {self._where()}")
        await self._call(key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def url(self, key: str) -> str:
        """``s3://<bucket>/<prefix><key>``."""
        return f"s3://{self.bucket}/{self.prefix}{validate_key(key)}"
