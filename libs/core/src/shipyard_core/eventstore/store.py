"""Append and read events; the outbox rows are written in the same statement."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import asyncpg

from shipyard_core.db import Conn
from shipyard_core.errors import ConcurrencyError
from shipyard_core.eventstore.envelope import NewEvent, StoredEvent
from shipyard_core.eventstore.schema import validate_identifier
from shipyard_core.eventstore.upcasting import Upcasters

OUTBOX_CHANNEL = "shipyard_outbox"


def outbox_channel(service: str) -> str:
    """The NOTIFY channel an append wakes ``service``'s outbox relay on. One per service:
    on a shared channel every relay of every service woke (and PostgreSQL signalled each
    listening backend) for every append anywhere."""
    return f"{OUTBOX_CHANNEL}_{service}"


class OutboxMessage(NamedTuple):
    """A message (not an event) for the outbox, written with the events of a command
    (:meth:`EventStore.append_streams`): the relay publishes it once they commit, to
    whichever stream takes ``subject``, with ``Nats-Msg-Id`` = ``message_id``. A command's
    side message (e.g. a work item) then leaves exactly when its events do, whatever
    crashes."""

    subject: str
    body: bytes
    message_id: uuid.UUID
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class RowsInsert:
    """Rows of another table of the service, written by :meth:`EventStore.append_streams`
    in the statement that appends the events (only when the version check passes), so
    one round trip and no explicit transaction make them atomic."""

    table: str
    """``<schema>.<table>``."""
    columns: tuple[tuple[str, str], ...]
    """``(name, PostgreSQL type)`` of each column, in the order of the row tuples."""
    rows: Sequence[tuple[Any, ...]]


_COLUMNS = (
    "position, stream_id, version, event_id, aggregate, event_type, schema_version, "
    "payload, metadata, recorded_at"
)


class EventStore:
    """A service's append-only event store (schema ``<service>``) and its outbox.

    ``append`` is one SQL statement: the optimistic concurrency check, the events and
    their outbox rows commit together or not at all. A stale expected version raises
    ``ConcurrencyError``; it is never swallowed."""

    def __init__(
        self, pool: asyncpg.Pool, service: str, upcasters: Upcasters | None = None
    ) -> None:
        self.pool = pool
        self.service = validate_identifier(service)
        self.upcasters = upcasters or Upcasters()
        self._single_sql_text = self._single_sql()
        s = self.service
        self._append_sql = f"""
        WITH new AS (
            SELECT * FROM unnest(
                $1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::int[],
                $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::text[], $12::bytea[]
            ) WITH ORDINALITY AS t(stream_id, version, event_id, aggregate, event_type,
                schema_version, payload, metadata, recorded_at, subject, headers, body, ord)
        ), expected AS (
            SELECT bool_and(
                coalesce((SELECT max(e.version) FROM {s}.events e WHERE e.stream_id = x.sid), 0)
                = x.expected) AS ok
            FROM unnest($13::text[], $14::bigint[]) AS x(sid, expected)
        ), ins AS (
            INSERT INTO {s}.events (stream_id, version, event_id, aggregate, event_type,
                schema_version, payload, metadata, recorded_at)
            SELECT stream_id, version, event_id, aggregate, event_type, schema_version,
                payload::jsonb, metadata::jsonb, recorded_at
            FROM new WHERE (SELECT ok FROM expected) ORDER BY ord
            RETURNING position, event_id
        ), ob AS (
            INSERT INTO {s}.outbox (event_id, subject, headers, body)
            SELECT n.event_id, n.subject, n.headers::jsonb, n.body
            FROM new n JOIN ins USING (event_id) ORDER BY n.ord
            RETURNING 1
        )
        SELECT array_agg(ins.position ORDER BY ins.position) AS positions,
               (SELECT count(*) FROM ob) AS outboxed,
               pg_notify('{outbox_channel(s)}', '') IS NULL AS _
        FROM ins
        """

    def _single_sql(self) -> str:
        s = self.service
        # The common case (one command, one event) in a plain statement: ~25% cheaper for
        # PostgreSQL than the general unnest form (bench/eventstore).
        return f"""
        WITH ins AS (
            INSERT INTO {s}.events (stream_id, version, event_id, aggregate, event_type,
                schema_version, payload, metadata, recorded_at)
            SELECT $1, $2::bigint, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9
            WHERE coalesce((SELECT max(e.version) FROM {s}.events e WHERE e.stream_id = $1), 0)
                = $2::bigint - 1
            RETURNING position, event_id
        ), ob AS (
            INSERT INTO {s}.outbox (event_id, subject, headers, body)
            SELECT event_id, $10, $11::jsonb, $12 FROM ins
        )
        SELECT ARRAY[position] AS positions,
               pg_notify('{outbox_channel(s)}', '') IS NULL AS _
        FROM ins
        """

    async def append(
        self,
        events: Sequence[NewEvent],
        expected_version: int,
        conn: Conn | None = None,
    ) -> list[StoredEvent]:
        """Appends events to one stream whose current version must be ``expected_version``."""
        if not events:
            return []
        stream_ids = {e.stream_id for e in events}
        if len(stream_ids) != 1:
            raise ValueError("append() writes one stream; use append_streams() for several")
        return await self.append_streams([(events, expected_version)], conn)

    async def append_streams(
        self,
        writes: Sequence[tuple[Sequence[NewEvent], int]],
        conn: Conn | None = None,
        *,
        messages: Sequence[OutboxMessage] = (),
        rows: Sequence[RowsInsert] = (),
    ) -> list[StoredEvent]:
        """Appends to several streams atomically, each with its expected version.

        ``messages`` go into the outbox (see :class:`OutboxMessage`) and ``rows`` into
        their tables in the same statement, only if the append succeeds: a command's
        whole write in one round trip, atomic without an explicit transaction."""
        stored: list[StoredEvent] = []
        expected_ids: list[str] = []
        expected_versions: list[int] = []
        for events, expected in writes:
            if not events:
                continue
            expected_ids.append(events[0].stream_id)
            expected_versions.append(expected)
            for offset, event in enumerate(events, start=1):
                if event.stream_id != events[0].stream_id:
                    raise ValueError("each write must target a single stream")
                stored.append(self._envelope(event, expected + offset))
        if not stored:
            return []
        cols: list[list[Any]] = [[] for _ in range(12)]
        for ev in stored:
            headers = {"Nats-Msg-Id": str(ev.event_id)}
            traceparent = ev.metadata.get("traceparent")
            if traceparent:
                headers["traceparent"] = str(traceparent)
            row = (
                ev.stream_id,
                ev.version,
                ev.event_id,
                ev.aggregate,
                ev.event_type,
                ev.schema_version,
                json.dumps(ev.payload, separators=(",", ":")),
                json.dumps(ev.metadata, separators=(",", ":")),
                ev.recorded_at,
                ev.subject,
                json.dumps(headers),
                ev.encode(),
            )
            for col, value in zip(cols, row, strict=True):
                col.append(value)
        sql = self._append_sql
        args: list[Any] = [*cols, expected_ids, expected_versions]
        if messages or rows:
            sql, extra = self._with_side_writes(messages, rows, first_param=len(args) + 1)
            args += extra
        result: asyncpg.Record | None
        try:
            async with self._using(conn) as c:
                result = await c.fetchrow(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            first = stored[0]
            raise ConcurrencyError(first.stream_id, first.version - 1) from exc
        positions: list[int] | None = result["positions"] if result else None
        if not positions:
            first = stored[0]
            raise ConcurrencyError(first.stream_id, first.version - 1)
        return [replace(ev, position=pos) for ev, pos in zip(stored, positions, strict=True)]

    def _with_side_writes(
        self, messages: Sequence[OutboxMessage], rows: Sequence[RowsInsert], first_param: int
    ) -> tuple[str, list[Any]]:
        """The append statement with CTEs writing ``messages`` and ``rows`` when the
        version check passes (data-modifying CTEs run whether or not they are read); their
        parameters are numbered from ``first_param`` on."""
        ctes: list[str] = []
        args: list[Any] = []
        ok = "WHERE (SELECT ok FROM expected)"

        def params(types: Sequence[str]) -> str:
            first = first_param + len(args)
            return ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))

        if messages:
            ctes.append(
                f"msg AS (INSERT INTO {self.service}.outbox (event_id, subject, headers, body) "
                f"SELECT * FROM unnest({params(('uuid', 'text', 'jsonb', 'bytea'))}) {ok})"
            )
            args += [
                [m.message_id for m in messages],
                [m.subject for m in messages],
                [
                    json.dumps({**(m.headers or {}), "Nats-Msg-Id": str(m.message_id)})
                    for m in messages
                ],
                [m.body for m in messages],
            ]
        for n, insert in enumerate(rows):
            names = ", ".join(validate_identifier(name) for name, _ in insert.columns)
            table = ".".join(validate_identifier(part) for part in insert.table.split("."))
            ctes.append(
                f"side{n} AS (INSERT INTO {table} ({names}) "
                f"SELECT * FROM unnest({params([t for _, t in insert.columns])}) {ok})"
            )
            args += [[row[i] for row in insert.rows] for i in range(len(insert.columns))]
        head, _, tail = self._append_sql.partition("), ob AS (")
        return f"{head}), {', '.join(ctes)}, ob AS ({tail}", args

    def _envelope(self, event: NewEvent, version: int) -> StoredEvent:
        return StoredEvent(
            service=self.service,
            event_id=event.event_id,
            stream_id=event.stream_id,
            version=version,
            aggregate=event.aggregate,
            event_type=event.event_type,
            schema_version=event.schema_version,
            payload=event.payload,
            metadata=event.metadata,
            recorded_at=event.recorded_at,
        )

    async def read_stream(
        self, stream_id: str, after_version: int = 0, conn: Conn | None = None
    ) -> list[StoredEvent]:
        """A stream's events in version order, upcast to their current schema."""
        sql = (
            f"SELECT {_COLUMNS} FROM {self.service}.events "
            "WHERE stream_id = $1 AND version > $2 ORDER BY version"
        )
        async with self._using(conn) as c:
            rows = await c.fetch(sql, stream_id, after_version)
        return [self._row_to_event(r) for r in rows]

    async def read_streams(
        self, stream_ids: Sequence[str], conn: Conn | None = None
    ) -> dict[str, list[StoredEvent]]:
        """Several streams' events in one query, each in version order (a stream with no
        events maps to an empty list)."""
        sql = (
            f"SELECT {_COLUMNS} FROM {self.service}.events "
            "WHERE stream_id = ANY($1::text[]) ORDER BY stream_id, version"
        )
        async with self._using(conn) as c:
            rows = await c.fetch(sql, list(stream_ids))
        out: dict[str, list[StoredEvent]] = {sid: [] for sid in stream_ids}
        for row in rows:
            event = self._row_to_event(row)
            out.setdefault(event.stream_id, []).append(event)
        return out

    async def read_all(
        self,
        after_position: int = 0,
        limit: int = 1000,
        conn: Conn | None = None,
        stream_id: str | None = None,
    ) -> list[StoredEvent]:
        """Events of every stream in commit order, after the event at ``after_position``.

        Only transactions below the snapshot's xmin are read: every one of them has
        finished, and any transaction still running will get a higher position in this
        order, so a reader that resumes from its last position never skips an event."""
        conditions = ["tx_id < pg_snapshot_xmin(pg_current_snapshot())"]
        args: list[Any] = [limit]
        if after_position > 0:
            args.append(after_position)
            conditions.append(
                f"(tx_id, position) > (SELECT tx_id, position FROM {self.service}.events "
                f"WHERE position = ${len(args)})"
            )
        if stream_id:
            args.append(stream_id)
            conditions.append(f"stream_id = ${len(args)}")
        sql = (
            f"SELECT {_COLUMNS} FROM {self.service}.events WHERE {' AND '.join(conditions)} "
            "ORDER BY tx_id, position LIMIT $1"
        )
        async with self._using(conn) as c:
            rows = await c.fetch(sql, *args)
        return [self._row_to_event(r) for r in rows]

    @contextlib.asynccontextmanager
    async def _using(self, conn: Conn | None) -> AsyncIterator[Conn]:
        """``conn`` when the caller gives one (its transaction), else one of the pool's."""
        if conn is not None:
            yield conn
            return
        async with self.pool.acquire() as c:
            yield c

    async def count(self) -> int:
        """How many events the store holds."""
        async with self.pool.acquire() as c:
            return int(await c.fetchval(f"SELECT count(*) FROM {self.service}.events"))

    def _row_to_event(self, r: asyncpg.Record) -> StoredEvent:
        payload = r["payload"]
        metadata = r["metadata"]
        event = StoredEvent(
            service=self.service,
            event_id=r["event_id"],
            stream_id=r["stream_id"],
            version=r["version"],
            aggregate=r["aggregate"],
            event_type=r["event_type"],
            schema_version=r["schema_version"],
            payload=payload if isinstance(payload, dict) else json.loads(payload),
            metadata=metadata if isinstance(metadata, dict) else json.loads(metadata),
            recorded_at=r["recorded_at"],
            position=r["position"],
        )
        return self.upcasters.upcast(event)
