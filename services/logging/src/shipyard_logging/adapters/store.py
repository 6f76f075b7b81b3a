"""The tables of stored log lines: day partitions, writes, retention.

``logging.lines`` is partitioned by day of ``at`` (UTC): retention drops whole partitions
(cheap, no vacuum), and a query for recent lines touches the few partitions of its days.
Two indexes serve the queries:

- ``(source, "offset")``: the last N lines of one instance (a backward index scan per
  partition, merged), and the whole log of an instance in order;
- ``(deployment, seq)``: the last N lines of a deployment, and following it (``seq``
  numbers rows in the order the single ingester committed them).

``logging.sources`` holds one row per source (instance or build): the position up to
which its lines are stored (``next_offset``, the ingester's dedupe and gap check), its
line count and time span, and for a build its group (who reads it) and image name.

Build lines share the table with instances' lines (``kind`` ``build``, the build id as
``source``, the line number as ``offset``, ``deployment`` empty): the same partitions,
retention, ingest and queries serve both; ``(source, "offset")`` answers "last N lines
of a build" and its download, ``(deployment, seq)`` with the empty deployment its follow.
Sources are keyed by id alone: build ids (``b-`` and 16 hex digits) cannot be instance
ids (``<deployment>-r<revision>-<suffix>``, or a pod name with two dashes at least).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from shipyard_core.db import Conn
from shipyard_core.logbatch import Line, LogBatch

SCHEMA = "logging"
LINES = f"{SCHEMA}.lines"
SOURCES = f"{SCHEMA}.sources"
LINE_COLUMNS = (
    "at",
    "kind",
    "source",
    "deployment",
    "revision",
    "stream",
    "offset",
    "text",
    "cut",
)
_PARTITION = re.compile(r"^(?P<table>[a-z_]+)_(?P<day>\d{8})$")

_DDL = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {LINES} (
        seq bigint GENERATED ALWAYS AS IDENTITY,
        at timestamptz NOT NULL,
        kind text NOT NULL,
        source text NOT NULL,
        deployment text NOT NULL,
        revision int NOT NULL,
        stream text NOT NULL,
        "offset" bigint NOT NULL,
        text text NOT NULL,
        cut boolean NOT NULL
    ) PARTITION BY RANGE (at)""",
    f'CREATE INDEX IF NOT EXISTS lines__source_offset ON {LINES} (source, "offset")',
    f"CREATE INDEX IF NOT EXISTS lines__deployment_seq ON {LINES} (deployment, seq)",
    f"""CREATE TABLE IF NOT EXISTS {SOURCES} (
        source text PRIMARY KEY,
        kind text NOT NULL,
        deployment text NOT NULL,
        revision int NOT NULL,
        stream text NOT NULL,
        next_offset bigint NOT NULL,
        lines bigint NOT NULL,
        first_at timestamptz,
        last_at timestamptz,
        updated_at timestamptz NOT NULL
    )""",
    f"CREATE INDEX IF NOT EXISTS sources__deployment ON {SOURCES} (deployment)",
    # A build's group and image name (from its batches; empty for instances, and for a
    # build whose batches did not say: then admins only read it). Added after the table
    # existed, hence ALTER.
    f"ALTER TABLE {SOURCES} ADD COLUMN IF NOT EXISTS group_name text NOT NULL DEFAULT ''",
    f"ALTER TABLE {SOURCES} ADD COLUMN IF NOT EXISTS image text NOT NULL DEFAULT ''",
)


async def ensure_tables(conn: Conn) -> None:
    """Creates the schema, the partitioned table and its indexes if missing."""
    async with conn.transaction():
        # Replicas starting together must not race on CREATE ... IF NOT EXISTS.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('shipyard.logging.ddl'))")
        for statement in _DDL:
            await conn.execute(statement)


def partition_name(day: date, table: str = "lines") -> str:
    """``<table>_YYYYMMDD``: the day partition of ``logging.<table>``."""
    return f"{table}_{day:%Y%m%d}"


def day_of(at: datetime) -> date:
    """The UTC day of a timestamp."""
    return at.astimezone(UTC).date()


async def partitions(conn: Conn, table: str = "lines") -> dict[date, str]:
    """The existing day partitions of ``logging.<table>``."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass",
        f"{SCHEMA}.{table}",
    )
    found: dict[date, str] = {}
    for row in rows:
        match = _PARTITION.match(row["relname"])
        if match and match.group("table") == table:
            found[datetime.strptime(match.group("day"), "%Y%m%d").date()] = row["relname"]
    return found


async def ensure_partitions(
    conn: Conn, days: Iterable[date], known: set[date], table: str = "lines"
) -> None:
    """Creates the day partitions of ``days`` that are not in ``known`` (and adds them)."""
    for day in sorted(set(days) - known):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        end = start + timedelta(days=1)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('shipyard.logging.ddl'))")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA}.{partition_name(day, table)} "
                f"PARTITION OF {SCHEMA}.{table} "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
        known.add(day)


async def drop_partitions_before(conn: Conn, cutoff: datetime, table: str) -> list[str]:
    """Drops the day partitions of ``logging.<table>`` that end at or before ``cutoff``;
    returns their names."""
    dropped: list[str] = []
    for day, name in sorted((await partitions(conn, table)).items()):
        day_end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
        if day_end <= cutoff:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('shipyard.logging.ddl'))")
                await conn.execute(f"DROP TABLE IF EXISTS {SCHEMA}.{name}")
            dropped.append(name)
    return dropped


async def drop_expired(conn: Conn, now: datetime, retention: timedelta) -> list[str]:
    """Drops the line partitions whose whole day is older than ``now - retention``, and
    the sources with no line left; returns the dropped partitions' names."""
    dropped = await drop_partitions_before(conn, now - retention, "lines")
    if dropped:
        oldest_kept = min(
            (datetime(d.year, d.month, d.day, tzinfo=UTC) for d in await partitions(conn)),
            default=now,
        )
        await conn.execute(f"DELETE FROM {SOURCES} WHERE last_at < $1", oldest_kept)
    return dropped


def line_record(batch: LogBatch, line: Line) -> tuple[Any, ...]:
    """One row for COPY, in :data:`LINE_COLUMNS` order."""
    return (
        line.at,
        batch.kind,
        batch.source,
        batch.deployment,
        batch.revision,
        batch.stream,
        line.offset,
        line.text,
        line.cut,
    )


async def write_lines(conn: Conn, records: Sequence[tuple[Any, ...]]) -> None:
    """Appends rows (COPY; their partitions must exist)."""
    if records:
        await conn.copy_records_to_table(
            "lines", schema_name=SCHEMA, columns=list(LINE_COLUMNS), records=records
        )


async def source_positions(conn: Conn, sources: Sequence[str]) -> dict[str, int]:
    """``next_offset`` of each known source, locked for this transaction."""
    rows = await conn.fetch(
        f"SELECT source, next_offset FROM {SOURCES} WHERE source = ANY($1::text[]) FOR UPDATE",
        list(sources),
    )
    return {r["source"]: int(r["next_offset"]) for r in rows}


async def save_sources(
    conn: Conn, updates: Sequence[tuple[LogBatch, int, int, datetime | None, datetime | None]]
) -> None:
    """Upserts each source's position: ``(last batch, next_offset, lines added, first
    and last time of the added lines)``. A build's group and image name are the last
    ones a batch named (a batch without them keeps what is stored)."""
    await conn.executemany(
        f"""INSERT INTO {SOURCES} AS s (source, kind, deployment, revision, stream,
                next_offset, lines, first_at, last_at, updated_at, group_name, image)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now(), $10, $11)
            ON CONFLICT (source) DO UPDATE SET
                next_offset = GREATEST(s.next_offset, EXCLUDED.next_offset),
                lines = s.lines + EXCLUDED.lines,
                first_at = LEAST(s.first_at, EXCLUDED.first_at),
                last_at = GREATEST(s.last_at, EXCLUDED.last_at),
                revision = EXCLUDED.revision,
                group_name = COALESCE(NULLIF(EXCLUDED.group_name, ''), s.group_name),
                image = COALESCE(NULLIF(EXCLUDED.image, ''), s.image),
                updated_at = now()""",
        [
            (
                b.source,
                b.kind,
                b.deployment,
                b.revision,
                b.stream,
                pos,
                added,
                first,
                last,
                b.group,
                b.image,
            )
            for b, pos, added, first, last in updates
        ],
    )


async def build_owner(conn: Conn, build_id: str) -> str | None:
    """The group of a build with stored lines (empty: lines from before builds named
    one); None when none are stored."""
    group = await conn.fetchval(
        f"SELECT group_name FROM {SOURCES} WHERE source = $1 AND kind = 'build'", build_id
    )
    return None if group is None else str(group)
