"""Pytest plugin ``shipyard``: real NATS (JetStream) and real PostgreSQL on free ports.

Fixtures:

- ``postgres_server`` (session): one PostgreSQL for the whole session, fsync off, in a tmp
  dir.
- ``embedded_tmp_path`` (function): a directory for servers a test starts itself.
- ``database_url`` (function): a fresh, empty database per test, dropped afterwards.
- ``nats_server`` (function): a fresh NATS with JetStream per test, stopped afterwards.
- ``nats_url`` (function): its ``nats://`` URL.
- ``moto_endpoint`` (module): a real S3 server (moto's standalone server, see
  ``shipyard_testing.s3``) on a free loopback port, with fake credentials and
  ``SHIPYARD_S3_ENDPOINT`` pointing at it in the environment while the module runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, overload

import pytest

from shipyard_core.embedded import NatsProcess, PostgresProcess, start_nats, start_postgres
from shipyard_testing.s3 import moto_server, s3_environment

T = TypeVar("T")


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    message: str = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


@overload
async def wait_for(
    predicate: Callable[[], T],
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    message: str = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


async def wait_for(
    predicate: Callable[[], Any],
    # A plain deadline parameter (not asyncio.timeout) so the failure carries ``message``.
    timeout: float = 10.0,  # noqa: ASYNC109
    interval: float = 0.01,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Awaits until ``predicate()`` (sync or async) returns something truthy and returns it.

    Raises ``AssertionError`` with ``message`` (and the last value seen) after ``timeout``
    seconds. Exceptions of the types in ``ignore`` count as "not yet" (e.g.
    ``ConnectionRefusedError`` while a server starts); others propagate at once.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"condition not met within {timeout}s: {message or predicate!r} (last: {last!r})"
            )
        await asyncio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Blocking twin of :func:`wait_for` for a synchronous ``predicate``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"condition not met within {timeout}s: {message or predicate!r} (last: {last!r})"
            )
        time.sleep(interval)


@contextlib.contextmanager
def _server_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        yield tmp_path_factory.mktemp(name)
        return
    # As root, PostgreSQL runs as a system user that must traverse the path to its data.
    # pytest resets its tmp root (/tmp/pytest-of-root) to 0700 whenever *any* pytest session
    # starts, which races with initdb/start in a concurrent session. So: outside it.
    path = Path(tempfile.mkdtemp(prefix=f"shipyard-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def embedded_tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh directory for the data of embedded servers a test starts itself (use it
    instead of ``tmp_path`` for PostgreSQL: see ``_server_dir``). Removed afterwards when it
    is not under pytest's tmp root."""
    with _server_dir(tmp_path_factory, "test") as path:
        yield path


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresProcess]:
    """One PostgreSQL for the test session (fsync off: tests want speed, not durability)."""
    with _server_dir(tmp_path_factory, "postgres") as path:
        server = start_postgres(path, fsync=False)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def database_url(postgres_server: PostgresProcess) -> Iterator[str]:
    """URL of a fresh, empty database on the session's PostgreSQL; dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:20]}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        # Best effort: a test that leaves the server stopped must not fail on teardown.
        try:
            if postgres_server.is_running():
                postgres_server.drop_database(name)
        except Exception:  # noqa: S110
            pass


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsProcess]:
    """A fresh NATS with JetStream (file store, fsync always) on a free port, per test."""
    server = start_nats(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsProcess) -> str:
    """``nats://127.0.0.1:PORT`` of this test's NATS."""
    return nats_server.url


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server for this test module, with fake
    credentials and ``SHIPYARD_S3_ENDPOINT`` set in the environment meanwhile (processes
    the tests start inherit them). Make a bucket per test: the server's state is shared."""
    with (
        moto_server(tmp_path_factory.mktemp("moto")) as endpoint,
        pytest.MonkeyPatch.context() as mp,
    ):
        s3_environment(mp, endpoint)
        yield endpoint
