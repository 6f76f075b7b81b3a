"""Build logs: every line a build prints, kept per build, readable live, and sent to LOGS.

Lines are telemetry, not domain events: they go to ``imagebuild.build_logs`` in batches
(one insert per flush), and followers wake on a NOTIFY instead of polling hard.

Every stored line is also published to the ``LOGS`` stream, for the logging service
(``shipyard_core.logbatch``: kind ``build``, the build id as the source, the line number
as the offset, the build's group and image name for access). Durably, in this order:

1. a flush stores the lines (and the build's highest stored line number in
   ``imagebuild.build_log_shipping``) in one transaction;
2. then the lines are published, batch after batch, each awaiting JetStream's ack;
3. then the end of the last acknowledged batch is saved as the build's ``position``.

Whatever lies between ``position`` and the stored lines is published again: by the next
attempt of the build when it starts (a builder killed mid-build), and by
:func:`ship_leftovers` for builds whose writer is gone (a builder killed after the last
lines were stored, or ``LOGS`` unreachable when the build ended). A batch sent twice has
the same ``Nats-Msg-Id`` (JetStream keeps one), or a longer range whose lines the logging
service skips below the position it stored: each line is kept once. Publishing never
holds up storing: a build goes on, and its log stays readable here, while NATS is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from shipyard_core.aio import pause
from shipyard_core.db import Conn
from shipyard_core.logbatch import MAX_BATCH_BYTES, Line, LogBatch, LogPublisher

log = logging.getLogger(__name__)

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
SHIPPING = "imagebuild.build_log_shipping"
SHIPPING_DDL = (
    f"""CREATE TABLE IF NOT EXISTS {SHIPPING} (
        build_id text PRIMARY KEY,
        group_name text NOT NULL,
        image text NOT NULL,
        stored bigint NOT NULL DEFAULT 0,
        position bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    # The builds whose stored lines LOGS has not acknowledged yet (normally none for long).
    f"CREATE INDEX IF NOT EXISTS build_log_shipping__behind ON {SHIPPING} (updated_at) "
    "WHERE stored >= greatest(position, 1)",
)
"""Per build published to ``LOGS``: its group and image name, ``stored`` (the highest
line number in ``build_logs``) and ``position`` (lines below it are acknowledged in
``LOGS``; 0: none). ``updated_at`` moves when lines are stored or acknowledged."""


async def ensure_table(conn: Conn) -> None:
    """Creates the log tables (idempotent)."""
    await conn.execute(DDL)
    for statement in SHIPPING_DDL:
        await conn.execute(statement)


def _chunks(lines: Sequence[Line]) -> list[list[Line]]:
    """Consecutive lines in pieces of at most :data:`MAX_BATCH_BYTES` of text (at least
    one line each)."""
    chunks: list[list[Line]] = []
    current: list[Line] = []
    size = 0
    for line in lines:
        length = len(line.text.encode("utf-8", errors="replace")) + 1
        if current and size + length > MAX_BATCH_BYTES:
            chunks.append(current)
            current, size = [], 0
        current.append(line)
        size += length
    if current:
        chunks.append(current)
    return chunks


class BuildLogShipper:
    """Publishes one build's stored lines to ``LOGS`` in order, and remembers how far
    JetStream acknowledged them (``position`` in :data:`SHIPPING`)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: LogPublisher,
        build_id: str,
        group: str = "",
        image: str = "",
    ) -> None:
        self.pool = pool
        self.publisher = publisher
        self.build_id = build_id
        self.group = group
        self.image = image
        self.position = 0
        """The end of the last acknowledged batch: lines below it are in ``LOGS``."""
        self.pending: list[Line] = []
        """Stored lines not acknowledged yet, in order."""
        self.published = 0
        """Lines published by this shipper (acknowledged)."""
        self._lock = asyncio.Lock()
        self._failing = False

    async def resume(self, *, register: bool = True) -> None:
        """Loads the position and the stored lines past it (what an earlier attempt, or
        a writer that was killed, stored but did not get acknowledged). ``register``
        records the build's group and image name first (a writer does; the leftover
        shipper reads them)."""
        async with self.pool.acquire() as conn:
            if register:
                row = await conn.fetchrow(
                    f"INSERT INTO {SHIPPING} (build_id, group_name, image) VALUES ($1, $2, $3) "
                    "ON CONFLICT (build_id) DO UPDATE SET group_name = EXCLUDED.group_name, "
                    "image = EXCLUDED.image RETURNING group_name, image, position",
                    self.build_id,
                    self.group,
                    self.image,
                )
            else:
                row = await conn.fetchrow(
                    f"SELECT group_name, image, position FROM {SHIPPING} WHERE build_id = $1",
                    self.build_id,
                )
            if row is None:
                return
            self.group, self.image = row["group_name"], row["image"]
            self.position = int(row["position"])
            rows = await conn.fetch(
                "SELECT seq, at, line FROM imagebuild.build_logs "
                "WHERE build_id = $1 AND seq >= $2 ORDER BY seq",
                self.build_id,
                self.position,
            )
        self.pending = [Line(r["seq"], r["at"], r["line"]) for r in rows]

    def add(self, lines: Sequence[Line]) -> None:
        """Lines just stored (after the ones already pending)."""
        self.pending.extend(lines)

    async def ship(self) -> bool:
        """Publishes the pending lines, batch after batch, each after the previous one
        was acknowledged, then saves the position. True when nothing is left; a failure
        is logged (once until it works again) and left for the next call."""
        async with self._lock:
            start = self.position
            try:
                for chunk in _chunks(list(self.pending)):
                    batch = LogBatch(
                        kind="build",
                        source=self.build_id,
                        deployment="",
                        revision=0,
                        stream="output",
                        start=self.position,
                        end=chunk[-1].offset + 1,
                        lines=chunk,
                        group=self.group,
                        image=self.image,
                    )
                    await self.publisher.publish(batch)
                    self.position = batch.end
                    del self.pending[: len(chunk)]
                    self.published += len(chunk)
                if self._failing:
                    log.info("build %s: its log reaches LOGS again", self.build_id)
                    self._failing = False
            except Exception as exc:
                if not self._failing:
                    log.warning(
                        "build %s: cannot publish its log to LOGS yet (%s: %s); it is kept "
                        "and sent later",
                        self.build_id,
                        type(exc).__name__,
                        exc,
                    )
                self._failing = True
            finally:
                if self.position > start:
                    await self._save()
            return not self.pending

    async def _save(self) -> None:
        try:
            await self.pool.execute(
                f"UPDATE {SHIPPING} SET position = greatest(position, $2), updated_at = now() "
                "WHERE build_id = $1",
                self.build_id,
                self.position,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Published but not remembered: sent again later, and kept once downstream.
            log.warning("build %s: cannot save its log position: %s", self.build_id, exc)


class BuildLogWriter:
    """Buffers a build's lines, writes them every ``interval`` seconds, and (with a
    ``publisher``) publishes them to ``LOGS`` once stored."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        build_id: str,
        interval: float = 0.2,
        *,
        publisher: LogPublisher | None = None,
        group: str = "",
        image: str = "",
    ) -> None:
        self.pool = pool
        self.build_id = build_id
        self.interval = interval
        self.lines: list[str] = []
        self._pending: list[tuple[str, int, datetime, str]] = []
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._store_lock = asyncio.Lock()
        self.shipper = (
            BuildLogShipper(pool, publisher, build_id, group, image) if publisher else None
        )
        self._shipping: asyncio.Task[bool] | None = None

    async def start(self, first_seq: int = 0) -> None:
        """Starts the periodic flush (continuing after ``first_seq`` on a retried build;
        what an earlier attempt stored but did not get into ``LOGS`` is published first)."""
        self._seq = first_seq
        if self.shipper is not None:
            await self.shipper.resume()
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
            await self._store()
            self._ship_soon()

    def _ship_soon(self) -> None:
        """Publishes in the background: a slow or absent NATS never delays storing."""
        if self.shipper is None or not self.shipper.pending:
            return
        if self._shipping is None or self._shipping.done():
            self._shipping = asyncio.create_task(self.shipper.ship())

    async def _store(self) -> None:
        async with self._store_lock:
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
                if self.shipper is not None:
                    await conn.execute(
                        f"UPDATE {SHIPPING} SET stored = greatest(stored, $2), "
                        "updated_at = now() WHERE build_id = $1",
                        self.build_id,
                        rows[-1][1],
                    )
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.build_id)
            if self.shipper is not None:
                self.shipper.add([Line(seq, at, text) for _, seq, at, text in rows])

    async def flush(self) -> None:
        """Writes what is buffered, then publishes what ``LOGS`` does not have yet,
        awaiting JetStream's acknowledgements (a failure leaves it for later)."""
        await self._store()
        if self.shipper is not None:
            await self.shipper.ship()

    async def close(self) -> None:
        """Stops the flusher, writes the rest and publishes it (what cannot be published
        now is left to :func:`ship_leftovers`)."""
        self._stop.set()
        if self._task is not None:
            await self._task
        reached = True
        if self._shipping is not None:
            reached = await self._shipping
        await self._store()
        # LOGS did not answer just now: do not wait for it a second time (the end of a
        # build would wait twice the publish timeout); the leftover shipper sends the rest.
        if self.shipper is not None and reached:
            await self.shipper.ship()


async def ship_leftovers(
    pool: asyncpg.Pool, publisher: LogPublisher, *, idle_seconds: float = 30.0, limit: int = 100
) -> int:
    """Publishes the stored lines ``LOGS`` has not acknowledged, of builds whose lines
    were last stored or acknowledged more than ``idle_seconds`` ago (their writer is gone:
    killed, or ``LOGS`` was unreachable when the build ended). Returns how many lines it
    published. Safe to run in several replicas and beside live writers: a line published
    twice is kept once."""
    rows = await pool.fetch(
        f"SELECT build_id FROM {SHIPPING} WHERE stored >= greatest(position, 1) "
        "AND updated_at < now() - make_interval(secs => $1) ORDER BY updated_at LIMIT $2",
        float(idle_seconds),
        limit,
    )
    published = 0
    for row in rows:
        shipper = BuildLogShipper(pool, publisher, row["build_id"])
        await shipper.resume(register=False)
        await shipper.ship()
        published += shipper.published
    if published:
        log.info("published %d build log lines LOGS had not acknowledged", published)
    return published


async def ship_leftovers_until(
    pool: asyncpg.Pool,
    publisher: LogPublisher,
    stop: asyncio.Event,
    *,
    every: float = 30.0,
    idle_seconds: float = 30.0,
) -> None:
    """Runs :func:`ship_leftovers` at once and then every ``every`` seconds until
    ``stop`` (a builder runs it beside its builds)."""
    while not stop.is_set():
        try:
            await ship_leftovers(pool, publisher, idle_seconds=idle_seconds)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("shipping leftover build log lines failed: %s", exc)
        await pause(stop, every)


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
