"""The object store, both backends through the same tests.

The S3 backend talks to a real moto server (``moto_server`` in a subprocess, over HTTP on
loopback: shipyard_testing's ``moto_endpoint`` fixture) through boto3: no moto decorators,
nothing patched in this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path

import boto3
import pytest

from shipyard_core.errors import FailedPrecondition, InvalidArgument, NotFound
from shipyard_core.objectstore import FileStore, ObjectStore, open_store
from shipyard_core.objectstore.s3 import S3Store


def _new_bucket(endpoint: str) -> str:
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """A fresh, empty store of each kind: a folder, or a new bucket (with a prefix, so the
    prefix handling is exercised too)."""
    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    endpoint: str = request.getfixturevalue("moto_endpoint")
    return open_store(f"s3://{_new_bucket(endpoint)}/env/test", endpoint_url=endpoint)


def _write_random(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


async def test_bytes_round_trip_and_overwrite(store: ObjectStore) -> None:
    assert not await store.exists("a/b/c.bin")
    await store.put_bytes("a/b/c.bin", b"first")
    assert await store.get_bytes("a/b/c.bin") == b"first"
    assert await store.exists("a/b/c.bin")
    assert await store.stat("a/b/c.bin") == 5
    await store.put_bytes("a/b/c.bin", b"second, longer")
    assert await store.get_bytes("a/b/c.bin") == b"second, longer"
    assert await store.stat("a/b/c.bin") == 14
    await store.put_bytes("empty", b"")
    assert await store.get_bytes("empty") == b""
    assert await store.stat("empty") == 0


async def test_urls_name_the_object(store: ObjectStore) -> None:
    if isinstance(store, FileStore):
        assert store.url("x/y.tar.gz") == (store.root / "x/y.tar.gz").as_uri()
        assert store.url("x/y.tar.gz").startswith("file:///")
    else:
        assert isinstance(store, S3Store)
        assert store.url("x/y.tar.gz") == f"s3://{store.bucket}/env/test/x/y.tar.gz"


async def test_missing_keys_are_not_found(store: ObjectStore, tmp_path: Path) -> None:
    await store.put_bytes("present", b"1")
    with pytest.raises(NotFound, match="'absent'"):
        await store.get_bytes("absent")
    with pytest.raises(NotFound, match="'absent'"):
        await store.get_file("absent", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    with pytest.raises(NotFound, match="'absent'"):
        await store.delete("absent")
    await store.delete("absent", missing_ok=True)
    assert await store.stat("absent") is None
    assert not await store.exists("absent")
    # A key that is a folder of other keys is not an object either.
    await store.put_bytes("dir/inner", b"1")
    assert await store.stat("dir") is None
    with pytest.raises(NotFound):
        await store.get_bytes("dir")


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "../up", "a/../b", "a//b", "a/./b", "a/", "a\\b", "a\x00b", "k" * 1025],
)
async def test_bad_keys_are_refused_before_any_io(store: ObjectStore, key: str) -> None:
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.stat(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(InvalidArgument) as info:
            await call()
        assert info.value.field == "key"
        assert "relative path" in info.value.message
    with pytest.raises(InvalidArgument):
        store.url(key)
    assert await store.list() == []


async def test_listing_reads_every_page(store: ObjectStore) -> None:
    # S3 answers at most 1000 keys per page: 1100 crosses a page boundary.
    keys = [f"many/{i:05d}.json" for i in range(1100)]
    semaphore = asyncio.Semaphore(16)

    async def put(key: str) -> None:
        async with semaphore:
            await store.put_bytes(key, key.encode())

    await asyncio.gather(*(put(k) for k in keys))
    await store.put_bytes("other/one", b"1")
    await store.put_bytes("manyx", b"1")

    listed = await store.list("many/")
    assert len(listed) == 1100
    assert listed == sorted(keys)
    # A prefix is a string prefix, as in S3, not a folder name.
    assert await store.list("many/0000") == [f"many/{i:05d}.json" for i in range(10)]
    assert await store.list("many") == [*sorted(keys), "manyx"]
    everything = await store.list()
    assert len(everything) == 1102 and "other/one" in everything
    assert await store.list("nothing/") == []

    await store.delete("other/one")
    assert await store.list("other/") == []
    assert await store.list("other") == []


async def test_a_20_mb_file_streams_both_ways(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    digest = _write_random(src, 20 * 1024 * 1024)
    assert await store.put_file("packs/big.bin", src) == 20 * 1024 * 1024
    assert await store.stat("packs/big.bin") == 20 * 1024 * 1024

    dest = tmp_path / "down" / "deeper" / "big.bin"
    assert await store.get_file("packs/big.bin", dest) == 20 * 1024 * 1024
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
    # The download went through a temporary file that is gone now.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["big.bin"]


async def test_s3_big_uploads_are_multipart(moto_endpoint: str, tmp_path: Path) -> None:
    bucket = _new_bucket(moto_endpoint)
    store = open_store(f"s3://{bucket}", endpoint_url=moto_endpoint)
    src = tmp_path / "big.bin"
    _write_random(src, 20 * 1024 * 1024)
    await store.put_file("big.bin", src)
    head = boto3.client("s3", endpoint_url=moto_endpoint).head_object(Bucket=bucket, Key="big.bin")
    # A multipart object's ETag is "<md5 of part md5s>-<part count>".
    assert head["ETag"].strip('"').endswith("-2")


async def test_content_addressed_put_dedups(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "pack.tar.gz"
    digest = _write_random(src, 3000)
    result = await store.put_content_addressed(src, "packs/")
    assert result == (digest, f"packs/sha256/{digest}", 3000)
    assert await store.get_bytes(result[1]) == src.read_bytes()

    # Make the stored object distinguishable (same size): a second put of the same content
    # must not upload, so the marker stays.
    await store.put_bytes(result[1], b"m" * 3000)
    assert await store.put_content_addressed(src, "packs") == result
    assert await store.get_bytes(result[1]) == b"m" * 3000

    # A truncated object (different size) is not taken for the content: it is replaced.
    await store.put_bytes(result[1], b"short")
    await store.put_content_addressed(src, "packs")
    assert await store.get_bytes(result[1]) == src.read_bytes()

    other = tmp_path / "other.tar.gz"
    other_digest = _write_random(other, 10)
    assert (await store.put_content_addressed(other, "packs"))[0] == other_digest
    assert await store.list("packs/sha256/") == sorted(
        [f"packs/sha256/{digest}", f"packs/sha256/{other_digest}"]
    )
    with pytest.raises(InvalidArgument, match="prefix"):
        await store.put_content_addressed(src, "../escape")


async def test_file_store_writes_atomically_and_refuses_clashes(tmp_path: Path) -> None:
    store = open_store((tmp_path / "root").as_uri())
    assert isinstance(store, FileStore)
    await store.put_bytes("a/b", b"1")
    # No temporary file is left behind, and the temp folder never shows up as a key.
    assert list((tmp_path / "root" / ".shipyard-tmp").iterdir()) == []
    assert await store.list() == ["a/b"]
    with pytest.raises(FailedPrecondition, match="'a'"):
        await store.put_bytes("a", b"x")
    with pytest.raises(FailedPrecondition, match="'a/b/c'"):
        await store.put_bytes("a/b/c", b"x")
    assert await store.get_bytes("a/b") == b"1"
    # Deleting the last key of a folder removes the folder, so its name is free again.
    await store.delete("a/b")
    await store.put_bytes("a", b"now a key")
    assert await store.list() == ["a"]
    with pytest.raises(InvalidArgument, match="reserved"):
        await store.put_bytes(".shipyard-tmp/x", b"x")


async def test_s3_missing_bucket_says_so(moto_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket-here", endpoint_url=moto_endpoint)
    with pytest.raises(FailedPrecondition, match="bucket 'no-such-bucket-here' does not exist"):
        await store.put_bytes("k", b"1")
    with pytest.raises(FailedPrecondition, match="does not exist"):
        await store.list()


@pytest.mark.parametrize(
    "url",
    [
        "file://relative/path",
        "file:relative",
        "/just/a/path",
        "s3://",
        "s3://Bad_Bucket",
        "s3://ok-bucket/../x",
        "gs://bucket",
        "",
    ],
)
def test_invalid_urls_name_the_setting_and_the_forms(url: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        open_store(url)
    assert info.value.field == "SHIPYARD_OBJECT_STORE"
    assert "s3://bucket[/prefix]" in info.value.message


def test_valid_urls_open_their_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store((tmp_path / "x y").as_uri())
    assert isinstance(store, FileStore) and store.root == tmp_path / "x y"
    assert store.root.is_dir()

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("SHIPYARD_S3_ENDPOINT", "http://127.0.0.1:9")
    s3 = open_store("s3://my-bucket/a/b/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("my-bucket", "a/b/", "http://127.0.0.1:9")
    monkeypatch.delenv("SHIPYARD_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    assert open_store("s3://my-bucket").endpoint_url == "http://127.0.0.1:10"  # type: ignore[attr-defined]
