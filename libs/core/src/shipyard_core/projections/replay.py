"""Rebuild a projection from the event store into fresh tables, compare, swap.

The rebuild reads every followed event from the store (not from JetStream, whose
retention may be shorter) in commit order into ``<table>__rebuild`` tables. The swap
runs in one transaction that holds the projection's apply lock, so the live runner
pauses between two batches: the rebuild catches up with events committed meanwhile,
is compared with the live tables, and is renamed into place together with its
positions. The live runner then skips what the rebuild already holds."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import asyncpg

from shipyard_core.db import Conn
from shipyard_core.eventstore import EventStore, StoredEvent
from shipyard_core.projections.base import (
    Projection,
    Statement,
    Tables,
    execute_statements,
    index_name,
)

REBUILD_SUFFIX = "__rebuild"
_READ_BATCH = 5000


@dataclass
class ReplayResult:
    """What a replay did and found."""

    projection: str
    events: int = 0
    seconds: float = 0.0
    swapped: bool = False
    equal: bool = False
    differences: list[str] = field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        """Rebuild throughput."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


class _Rebuild:
    def __init__(self, projection: Projection, pool: asyncpg.Pool) -> None:
        self.projection = projection
        self.pool = pool
        self.tables = Tables(projection.schema, projection.tables, REBUILD_SUFFIX)
        self.positions: dict[str, int] = {}
        self.cursors: dict[str, int] = defaultdict(int)
        self.events = 0
        by_service: dict[str, set[str]] = defaultdict(set)
        for service, aggregate in projection.sources:
            by_service[service].add(aggregate)
        self.sources = dict(by_service)
        self.stores = {svc: EventStore(pool, svc, projection.upcasters) for svc in self.sources}

    async def create(self, conn: Conn) -> None:
        for name in self.projection.tables:
            await conn.execute(f"DROP TABLE IF EXISTS {self.tables[name]}")
        await self.projection.create_tables(conn, self.tables)

    async def catch_up(self, conn: Conn) -> int:
        """Applies every followed event after the cursors; returns how many."""
        applied = 0
        for service, aggregates in self.sources.items():
            store = self.stores[service]
            while True:
                batch = await store.read_all(self.cursors[service], _READ_BATCH, conn=conn)
                if not batch:
                    break
                self.cursors[service] = batch[-1].position
                wanted = [e for e in batch if e.aggregate in aggregates]
                applied += await self._apply(conn, wanted)
        self.events += applied
        return applied

    async def _apply(self, conn: Conn, events: list[StoredEvent]) -> int:
        statements: list[Statement] = []
        for ev in events:
            if ev.version <= self.positions.get(ev.stream_id, 0):
                continue
            statements.extend(self.projection.handle(ev))
            self.positions[ev.stream_id] = ev.version
        async with conn.transaction():
            await execute_statements(conn, statements, self.tables)
        return len(events)

    async def compare(self, conn: Conn) -> list[str]:
        """Differences between live and rebuilt tables (and positions); empty if equal."""
        live = self.projection.live_tables()
        differences: list[str] = []
        for name in self.projection.tables:
            a, b = live[name], self.tables[name]
            only_live = await conn.fetch(f"SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b} LIMIT 5")
            only_new = await conn.fetch(f"SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a} LIMIT 5")
            differences += [f"{name}: only in live: {dict(r)}" for r in only_live]
            differences += [f"{name}: only in rebuild: {dict(r)}" for r in only_new]
        rows = await conn.fetch(
            f"SELECT stream_id, version FROM {self.projection.schema}.projection_positions "
            "WHERE projection = $1",
            self.projection.name,
        )
        live_positions = {r["stream_id"]: r["version"] for r in rows}
        if live_positions != self.positions:
            behind = [s for s, v in self.positions.items() if live_positions.get(s, 0) != v]
            differences.append(
                f"positions differ on {len(behind)} stream(s), e.g. {behind[:3]} "
                "(is the live projection still catching up?)"
            )
        return differences

    async def swap(self, conn: Conn) -> None:
        """Renames the rebuilt tables into place and replaces the positions."""
        schema, name = self.projection.schema, self.projection.name
        live = self.projection.live_tables()
        for table in self.projection.tables:
            await conn.execute(f"DROP TABLE IF EXISTS {live[table]}")
            await conn.execute(f"ALTER TABLE {self.tables[table]} RENAME TO {table}")
        for table, columns in self.projection.indexes:
            old = index_name(table, columns, REBUILD_SUFFIX)
            await conn.execute(
                f"ALTER INDEX IF EXISTS {schema}.{old} RENAME TO {index_name(table, columns)}"
            )
        await conn.execute(f"DELETE FROM {schema}.projection_positions WHERE projection = $1", name)
        await conn.executemany(
            f"INSERT INTO {schema}.projection_positions (projection, stream_id, version) "
            "VALUES ($1, $2, $3)",
            [(name, sid, v) for sid, v in self.positions.items()],
        )

    async def drop(self, conn: Conn) -> None:
        for name in self.projection.tables:
            await conn.execute(f"DROP TABLE IF EXISTS {self.tables[name]}")


async def replay_projection(
    projection: Projection, pool: asyncpg.Pool, *, swap: bool = True
) -> ReplayResult:
    """Rebuilds ``projection`` from the event store; swaps it in unless ``swap`` is False.

    Either way the rebuilt tables are compared with the live ones first, and the result
    says whether they were equal (with sample differences when not)."""
    result = ReplayResult(projection=projection.name)
    rebuild = _Rebuild(projection, pool)
    started = time.perf_counter()
    async with pool.acquire() as conn:
        await projection.create_tables(conn)  # the live ones, in case they never existed
        await rebuild.create(conn)
        try:
            await rebuild.catch_up(conn)
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))",
                    f"shipyard.projection.apply.{projection.schema}.{projection.name}",
                )
                await rebuild.catch_up(conn)
                result.differences = await rebuild.compare(conn)
                result.equal = not result.differences
                if swap:
                    await rebuild.swap(conn)
                    result.swapped = True
        finally:
            if not result.swapped:
                await rebuild.drop(conn)
    result.events = rebuild.events
    result.seconds = time.perf_counter() - started
    return result
