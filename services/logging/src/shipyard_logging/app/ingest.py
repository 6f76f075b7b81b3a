"""The ingester: LOGS batches into ``logging.lines``, each line once, in order.

Guarantees, and how:
- nothing lost across restarts: the durable consumer ``logging_ingest`` is acked only
  after the transaction that wrote the lines and the sources' positions committed; a
  crash before that redelivers the messages;
- nothing stored twice: each source's ``next_offset`` is stored with its lines; lines
  below it (a re-sent batch, a redelivery) are skipped;
- nothing stored out of order: a batch that starts after ``next_offset`` (its
  predecessor still on its way, e.g. redelivered after a crash) is held in memory,
  unacknowledged, until the gap fills, for at most ``gap_wait_seconds``; then the gap is
  accepted and logged (its lines expired from the stream, or a shipper lost them). That
  wait must outlast the consumer's ``ack_wait``: the batches a killed ingester had
  fetched come back only after it, while the ones behind them reach the next ingester at
  once. Held batches are applied in each source's order (by start position);
- poison is bounded: an undecodable message is parked on ``DLQ``
  (``dlq.logging.logging_ingest``) and acknowledged;
- one writer: a session advisory lock elects the replica that ingests (and drops expired
  partitions); the others stand by and take over when it dies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shipyard_core.bus import LOGS_STREAM
from shipyard_core.db import Conn
from shipyard_core.logbatch import Line, LogBatch
from shipyard_logging.adapters import store
from shipyard_logging.app.consumer import INFRA_ERRORS, LeaderConsumer

log = logging.getLogger(__name__)

DURABLE = "logging_ingest"
# A line stamped further ahead than this (a shipper's clock is off) is stored at the
# time it arrived, so that it cannot create partitions far in the future.
_MAX_FUTURE = timedelta(hours=1)
_ANALYZE_MIN_ROWS = 5000


@dataclass
class IngestStats:
    """What the ingester did since it started (tests and logs read it)."""

    batches: int = 0
    lines: int = 0
    duplicates: int = 0
    expired: int = 0
    gaps: int = 0
    dropped_partitions: int = 0


@dataclass
class _Item:
    msg: Msg
    batch: LogBatch


class _SourceUpdate:
    """What one transaction adds to a source's row."""

    def __init__(self, batch: LogBatch) -> None:
        self.batch = batch
        self.position = 0
        self.added = 0
        self.first: datetime | None = None
        self.last: datetime | None = None

    def add(self, batch: LogBatch, position: int, stamps: list[datetime]) -> None:
        # A build's group and image: the last ones named (a batch without them, of the
        # format before them, changes nothing).
        self.batch = replace(
            batch, group=batch.group or self.batch.group, image=batch.image or self.batch.image
        )
        self.position = position
        self.added += len(stamps)
        if stamps:
            low, high = min(stamps), max(stamps)
            self.first = low if self.first is None else min(self.first, low)
            self.last = high if self.last is None else max(self.last, high)

    def row(self) -> tuple[LogBatch, int, int, datetime | None, datetime | None]:
        return self.batch, self.position, self.added, self.first, self.last


class Ingester(LeaderConsumer):
    """Runs the ``LOGS`` consumer until stopped."""

    stream = LOGS_STREAM
    durable = DURABLE
    filter_subject = "logs.>"
    what = "log ingest"

    def __init__(
        self,
        dsn: str,
        js: JetStreamContext,
        *,
        retention: timedelta,
        retention_interval: float = 600.0,
        batch_size: int = 256,
        ack_wait: float = 10.0,
        gap_wait_seconds: float = 15.0,
        retry_delay: float = 0.5,
        max_attempts: int = 5,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(
            dsn,
            js,
            retention_interval=retention_interval,
            batch_size=batch_size,
            ack_wait=ack_wait,
        )
        self.retention = retention
        if gap_wait_seconds <= ack_wait:
            raise ValueError("gap_wait_seconds must be longer than ack_wait")
        self.gap_wait_seconds = gap_wait_seconds
        self.retry_delay = retry_delay
        self.max_attempts = max_attempts
        # Since when (monotonic) each source has waited for a missing predecessor, and
        # the batches fetched but not written yet (by stream sequence): a batch that
        # arrives before its predecessor is held, unacknowledged, until it can go.
        self._gap_since: dict[str, float] = {}
        self._held: dict[int, _Item] = {}
        self.clock = clock
        self.stats = IngestStats()
        self._partitions: set[date] = set()
        # Rows written per day partition since it was last analyzed, and how many it had
        # then: a fresh partition has no statistics, and without them PostgreSQL plans
        # "last N lines of an instance" as a sort of every line instead of a backward
        # index scan (seconds instead of a millisecond at 1M lines).
        self._unanalyzed: dict[date, int] = {}
        self._analyzed: dict[date, int] = {}

    async def prepare(self, conn: Conn) -> None:
        """The tables exist; the known partitions are cached."""
        self._held.clear()
        self._gap_since.clear()
        await store.ensure_tables(conn)
        self._partitions = set(await store.partitions(conn))

    # -- retention -------------------------------------------------------------------

    async def drop_expired(self, conn: Conn) -> list[str]:
        """Drops the partitions past the retention (the ingester does it every
        ``retention_interval``; tests call it with a moved clock)."""
        dropped = await store.drop_expired(conn, self.clock(), self.retention)
        if dropped:
            log.info("dropped expired log partitions: %s", ", ".join(dropped))
            self.stats.dropped_partitions += len(dropped)
            self._partitions = set(await store.partitions(conn))
            for day in [d for d in self._analyzed if d not in self._partitions]:
                del self._analyzed[day]
        return dropped

    # -- writing ---------------------------------------------------------------------

    async def process(self, conn: Conn, msgs: list[Msg]) -> None:
        """Writes the lines of the batches (and of held ones now in order) in one
        transaction, then acks them; batches still waiting for a predecessor stay held."""
        for msg in msgs:
            try:
                item = _Item(msg, LogBatch.decode(msg.data))
            except ValueError as exc:
                await self.dead_letter(msg, str(exc))
                continue
            # A redelivery of a held batch replaces it (its newest delivery is acked).
            self._held[msg.metadata.sequence.stream] = item
        await self.idle(conn)

    async def idle(self, conn: Conn) -> None:
        """Writes what the held batches allow (a gap may have timed out meanwhile)."""
        if not self._held:
            return
        # Each source's batches in their order, whatever order they (or their
        # redeliveries) arrived in.
        items = sorted(
            self._held.values(),
            key=lambda i: (i.batch.source, i.batch.start, i.msg.metadata.sequence.stream),
        )
        now = self.clock()
        oldest = now - self.retention
        newest = now + _MAX_FUTURE
        days = {
            store.day_of(now if ln.at > newest else ln.at)
            for item in items
            for ln in item.batch.lines
            if ln.at >= oldest
        }
        await store.ensure_partitions(conn, days, self._partitions)
        failed: list[_Item] = []
        try:
            done, waiting = await self._apply(conn, items, now)
        except INFRA_ERRORS:
            raise
        except Exception:
            log.debug("log batch failed; retrying its messages one by one", exc_info=True)
            done, waiting = [], []
            for item in items:
                try:
                    one_done, one_waiting = await self._apply(conn, [item], now)
                except INFRA_ERRORS:
                    raise
                except Exception as exc:
                    if item.msg.metadata.num_delivered >= self.max_attempts:
                        await self.dead_letter(item.msg, f"{type(exc).__name__}: {exc}")
                    else:
                        failed.append(item)
                    continue
                done += one_done
                waiting += one_waiting
        for item in [*done, *failed]:
            self._held.pop(item.msg.metadata.sequence.stream, None)
        await asyncio.gather(*(i.msg.ack() for i in done))
        for item in failed:
            await item.msg.nak(delay=self.retry_delay)
        log.debug(
            "log ingest: %d batches written, %d held (waiting for: %s)",
            len(done),
            len(waiting),
            ", ".join(sorted(self._gap_since)) or "nothing",
        )
        await self._analyze_grown(conn)

    async def _analyze_grown(self, conn: Conn) -> None:
        """ANALYZEs the partitions that grew by a fifth (at least 5000 rows) since their
        last ANALYZE: cheap (a sample), and it keeps the plans right as a day fills."""
        for day, fresh in list(self._unanalyzed.items()):
            if fresh < max(_ANALYZE_MIN_ROWS, self._analyzed.get(day, 0) // 5):
                continue
            if day in self._partitions:
                await conn.execute(f"ANALYZE {store.SCHEMA}.{store.partition_name(day)}")
            self._analyzed[day] = self._analyzed.get(day, 0) + fresh
            del self._unanalyzed[day]

    async def _apply(
        self, conn: Conn, items: list[_Item], now: datetime
    ) -> tuple[list[_Item], list[_Item]]:
        """Writes what it can in one transaction; returns (written, still waiting)."""
        oldest = now - self.retention
        newest = now + _MAX_FUTURE
        counts = IngestStats()
        done: list[_Item] = []
        later: list[_Item] = []
        async with conn.transaction():
            positions = await store.source_positions(conn, [i.batch.source for i in items])
            waiting: set[str] = set()
            records: list[tuple[Any, ...]] = []
            updates: dict[str, _SourceUpdate] = {}
            for item in items:
                batch = item.batch
                position = positions.get(batch.source, 0)
                if batch.source in waiting:
                    later.append(item)
                    continue
                if batch.start > position:
                    since = self._gap_since.setdefault(batch.source, time.monotonic())
                    if time.monotonic() - since < self.gap_wait_seconds:
                        waiting.add(batch.source)
                        later.append(item)
                        continue
                    log.warning(
                        "log source %s: positions %d-%d never arrived; going on without them",
                        batch.source,
                        position,
                        batch.start,
                    )
                    counts.gaps += 1
                self._gap_since.pop(batch.source, None)
                fresh = [ln for ln in batch.lines if ln.offset >= position]
                counts.duplicates += len(batch.lines) - len(fresh)
                kept = []
                for line in fresh:
                    if line.at < oldest:
                        counts.expired += 1
                        continue
                    if line.at > newest:
                        line = Line(line.offset, now, line.text, line.cut)
                    kept.append(line)
                    records.append(store.line_record(batch, line))
                new_position = max(position, batch.end)
                positions[batch.source] = new_position
                update = updates.get(batch.source) or _SourceUpdate(batch)
                update.add(batch, new_position, [ln.at for ln in kept])
                updates[batch.source] = update
                counts.batches += 1
                counts.lines += len(kept)
                done.append(item)
            await store.write_lines(conn, records)
            await store.save_sources(conn, [u.row() for u in updates.values()])
        for record in records:
            day = store.day_of(record[0])
            self._unanalyzed[day] = self._unanalyzed.get(day, 0) + 1
        for name in ("batches", "lines", "duplicates", "expired", "gaps"):
            setattr(self.stats, name, getattr(self.stats, name) + getattr(counts, name))
        return done, later
