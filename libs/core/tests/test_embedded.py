"""The embedded launchers start real servers, and their data survives stops and crashes."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import StreamConfig

from shipyard_core.embedded import (
    EmbeddedServerError,
    NatsProcess,
    PostgresProcess,
    free_port,
    start_nats,
    start_postgres,
)
from shipyard_testing import wait_for, wait_for_sync


async def _publish(url: str, n: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="T", subjects=["t.>"]))
        for i in range(n):
            ack = await js.publish(f"t.{i}", f"m{i}".encode())
            assert ack.seq == i + 1
    finally:
        await nc.close()


async def _read_all(url: str) -> list[bytes]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("T")
        return [
            (await js.get_msg("T", seq)).data or b""
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]
    finally:
        await nc.close()


@pytest.fixture
def nats_proc(tmp_path: Path) -> Iterator[NatsProcess]:
    # A server of our own (not the plugin's) because these tests kill and restart it.
    server = start_nats(tmp_path / "nats")
    yield server
    server.stop()


async def test_nats_jetstream_roundtrip(nats_url: str) -> None:
    await _publish(nats_url, 3)
    assert await _read_all(nats_url) == [b"m0", b"m1", b"m2"]


async def test_nats_data_survives_stop_and_restart(nats_proc: NatsProcess) -> None:
    port = nats_proc.port
    await _publish(nats_proc.url, 5)
    nats_proc.stop()
    assert nats_proc.pid is None
    nats_proc.stop()  # idempotent
    nats_proc.restart()
    assert nats_proc.port == port
    assert await _read_all(nats_proc.url) == [f"m{i}".encode() for i in range(5)]


async def test_nats_data_survives_kill_and_restart(nats_proc: NatsProcess) -> None:
    await _publish(nats_proc.url, 5)
    old_pid = nats_proc.pid
    nats_proc.kill()
    assert nats_proc.pid is None
    nats_proc.restart()
    assert nats_proc.pid not in (None, old_pid)
    assert await _read_all(nats_proc.url) == [f"m{i}".encode() for i in range(5)]


def test_nats_explicit_port_and_log(tmp_path: Path) -> None:
    port = free_port()
    server = start_nats(tmp_path / "n", port=port)
    try:
        assert server.url == f"nats://127.0.0.1:{port}"
        assert "sync_interval: always" in (tmp_path / "n" / "nats.conf").read_text()
        assert "Server is ready" in server.log_path.read_text()
    finally:
        server.stop()


def test_nats_start_failure_reports_log_tail(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match="address already in use"):
            start_nats(tmp_path / "n", port=port)


async def _count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM kept"))
    finally:
        await conn.close()


async def test_postgres_committed_data_survives_kill_9(embedded_tmp_path: Path) -> None:
    tmp_path = embedded_tmp_path
    server = start_postgres(tmp_path / "pg", fsync=True)
    try:
        conn = await asyncpg.connect(server.url)
        await conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
        await conn.execute("INSERT INTO kept SELECT generate_series(1, 100)")
        await conn.close()
        port = server.port
        server.kill()
        assert server.pid is None
        server.restart()
        assert server.port == port
        assert await _count(server.url) == 100
        # A clean stop and a second start reuse the cluster (no new initdb).
        server.stop()
        server.stop()
        again = start_postgres(tmp_path / "pg", port=port)
        try:
            assert await _count(again.url) == 100
        finally:
            again.stop()
    finally:
        server.stop()


def test_postgres_start_failure_reports_log_tail(embedded_tmp_path: Path) -> None:
    tmp_path = embedded_tmp_path
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match=r"could not bind|in use"):
            start_postgres(tmp_path / "pg", port=port, fsync=False)


@pytest.mark.parametrize("run", [1, 2])
async def test_database_url_gives_a_fresh_empty_database(
    database_url: str, postgres_server: PostgresProcess, run: int
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0
        # The same table name in every run: it only works if each test has its own database.
        await conn.execute("CREATE TABLE kept (id int)")
        await conn.execute("INSERT INTO kept VALUES ($1)", run)
        assert await conn.fetchval("SELECT current_database()") != "postgres"
    finally:
        await conn.close()
    assert database_url.startswith(postgres_server.dsn(""))


async def test_wait_for_helpers() -> None:
    calls: list[int] = []

    def third_time() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert await wait_for(third_time, timeout=5) == 3

    async def async_true() -> str:
        return "yes"

    assert await wait_for(async_true) == "yes"
    with pytest.raises(AssertionError, match="never happens"):
        await wait_for(lambda: False, timeout=0.05, message="never happens")
    with pytest.raises(AssertionError, match="sync never"):
        wait_for_sync(lambda: None, timeout=0.05, message="sync never")

    def flaky() -> bool:
        calls.append(1)
        if len(calls) < 6:
            raise ConnectionRefusedError
        return True

    assert wait_for_sync(flaky, ignore=(ConnectionRefusedError,)) is True
