"""Build logs: every line a build prints, kept per build and readable live.

Lines are telemetry, not domain events: they go to ``imagebuild.build_logs`` in batches
(one insert per flush), and followers wake on a NOTIFY instead of polling hard."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg

from shipyard_core.db import Conn

CHANNEL = "shipyard_buildlog"
MAX_LINE = 8192
DDL = """
CREATE TABLE IF NOT EXISTS imagebuild.build_logs (
    build_id text NOT NULL,
    seq bigint NOT NULL,
    at timestamptz NOT NULL,
    line text NOT NULL,
    PRIMARY KEY (build_id, seq)
)
"""


async def ensure_table(conn: Conn) -> None:
    """Creates the log table (idempotent)."""
    await conn.execute(DDL)


class BuildLogWriter:
    """Buffers a build's lines and writes them every ``interval`` seconds."""

    def __init__(self, pool: asyncpg.Pool, build_id: str, interval: float = 0.2) -> None:
        self.pool = pool
        self.build_id = build_id
        self.interval = interval
        self.lines: list[str] = []
        self._pending: list[tuple[str, int, datetime, str]] = []
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self, first_seq: int = 0) -> None:
        """Starts the periodic flush (continuing after ``first_seq`` on a retried build)."""
        self._seq = first_seq
        self._task = asyncio.create_task(self._run())

    def write(self, line: str) -> None:
        """Records one line (thread-safe enough for the event loop: call from it)."""
        text = line.rstrip("\n")[:MAX_LINE]
        self.lines.append(text)
        self._seq += 1
        self._pending.append((self.build_id, self._seq, datetime.now(UTC), text))

    def tail(self, n: int = 40) -> str:
        """The last ``n`` lines, for a failed build's record."""
        return "\n".join(self.lines[-n:])

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
            await self.flush()

    async def flush(self) -> None:
        """Writes what is buffered."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO imagebuild.build_logs (build_id, seq, at, line) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (build_id, seq) DO UPDATE "
                "SET line = EXCLUDED.line, at = EXCLUDED.at",
                rows,
            )
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.build_id)

    async def close(self) -> None:
        """Stops the flusher and writes the rest."""
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.flush()


async def last_seq(pool: asyncpg.Pool, build_id: str) -> int:
    """The last stored line number of a build (0 when none)."""
    value = await pool.fetchval(
        "SELECT coalesce(max(seq), 0) FROM imagebuild.build_logs WHERE build_id = $1", build_id
    )
    return int(value or 0)


async def read_lines(
    pool: asyncpg.Pool, build_id: str, after: int, limit: int = 1000
) -> list[asyncpg.Record]:
    """Lines after ``after``, in order."""
    return await pool.fetch(
        "SELECT seq, at, line FROM imagebuild.build_logs WHERE build_id = $1 AND seq > $2 "
        "ORDER BY seq LIMIT $3",
        build_id,
        after,
        limit,
    )


async def follow(
    pool: asyncpg.Pool,
    build_id: str,
    finished: Any,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[asyncpg.Record]:
    """Every line of a build, then new ones as they come, until ``await finished()`` is
    true and nothing is left to read (or ``stop`` is set)."""
    wake = asyncio.Event()

    def on_notify(_c: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == build_id:
            wake.set()

    async with pool.acquire() as listener:
        await listener.add_listener(CHANNEL, on_notify)
        try:
            seq = 0
            while stop is None or not stop.is_set():
                wake.clear()
                rows = await read_lines(pool, build_id, seq)
                for row in rows:
                    seq = row["seq"]
                    yield row
                if rows:
                    continue
                if await finished():
                    # one last read: lines flushed just before the final state
                    for row in await read_lines(pool, build_id, seq):
                        yield row
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 0.5)
        finally:
            await listener.remove_listener(CHANNEL, on_notify)
