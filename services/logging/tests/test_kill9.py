"""kill -9 of the logging service while it ingests: every line is stored, once."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from shipyard_testing import wait_for

from .conftest import Bus, batch

SOURCES = [f"iris-r1-k{i}ll9" for i in range(4)]


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def spawn(database_url: str, nats_url: str, log: Path) -> asyncio.subprocess.Process:
    """``python -m shipyard_logging`` as ``shipyard up`` runs it, its log appended to
    ``log``."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")},
        "SHIPYARD_DATABASE_URL": database_url,
        "SHIPYARD_NATS_URL": nats_url,
        "SHIPYARD_GRPC_PORT": "0",
        "SHIPYARD_LOG_JSON": "false",
        "SHIPYARD_LOG_LEVEL": "WARNING",
        "SHIPYARD_INGEST_BATCH_SIZE": "16",
        # What a dead ingester had fetched comes back after 2 s (not 10), and gaps wait 3 s.
        "SHIPYARD_INGEST_ACK_WAIT_SECONDS": "2",
        "SHIPYARD_GAP_WAIT_SECONDS": "3",
    }
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shipyard_logging", env=env, stderr=out
        )


async def test_kill_9_while_ingesting_loses_nothing_and_stores_nothing_twice(
    database_url: str,
    nats_url: str,
    nats_bus: Bus,
    processes: list[asyncio.subprocess.Process],
    tmp_path: Path,
    db: asyncpg.Connection,
) -> None:
    log = tmp_path / "logging.log"
    positions = dict.fromkeys(SOURCES, 0)
    rounds_published = 0

    async def publish(rounds: int) -> None:
        nonlocal rounds_published
        for r in range(rounds_published, rounds_published + rounds):
            for source in SOURCES:
                texts = [f"{source} {r} {i}" for i in range(100)]
                b = batch(source, texts, start=positions[source])
                positions[source] = b.end
                await nats_bus.publish(b)
        rounds_published += rounds

    conn = db

    async def stored() -> int:
        return int(await conn.fetchval("SELECT count(*) FROM logging.lines"))

    await publish(100)  # 40,000 lines waiting
    proc = await spawn(database_url, nats_url, log)
    processes.append(proc)
    # Killed as soon as it has stored something (mid-ingest, unless it was very fast).
    await wait_for(
        lambda: _between(stored, 1, 40_000),
        timeout=60,
        interval=0.01,
        message="ingest never started",
        ignore=(asyncpg.UndefinedTableError,),
    )
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await publish(50)  # accepted while it is dead
    proc = await spawn(database_url, nats_url, log)
    processes.append(proc)
    done_before = await stored()
    await wait_for(lambda: _between(stored, done_before + 1, 60_000), timeout=60, interval=0.01)
    proc.send_signal(signal.SIGKILL)  # again, while it catches up
    await proc.wait()
    proc = await spawn(database_url, nats_url, log)
    processes.append(proc)
    try:
        await wait_for(lambda: _between(stored, 60_000, 60_000), timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the service's log:\n{log.read_text()[-3000:]}") from None
    doubled = await conn.fetchval(
        'SELECT count(*) FROM (SELECT source, "offset" FROM logging.lines '
        "GROUP BY 1, 2 HAVING count(*) > 1) d"
    )
    assert doubled == 0
    for source in SOURCES:
        texts = await conn.fetch(
            'SELECT text FROM logging.lines WHERE source = $1 ORDER BY "offset"', source
        )
        assert [r["text"] for r in texts] == [
            f"{source} {r} {i}" for r in range(150) for i in range(100)
        ]
        next_offset = await conn.fetchval(
            "SELECT next_offset FROM logging.sources WHERE source = $1", source
        )
        assert next_offset == positions[source]


async def _between(fn: object, low: int, high: int) -> bool:
    value = await fn()  # type: ignore[operator]
    return bool(low <= value <= high)
