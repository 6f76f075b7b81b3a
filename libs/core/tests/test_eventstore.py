"""The event store on a real PostgreSQL: optimistic concurrency and commit order."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from shipyard_core import db
from shipyard_core.errors import ConcurrencyError
from shipyard_core.eventstore import (
    EventStore,
    NewEvent,
    OutboxMessage,
    RowsInsert,
    StoredEvent,
    Upcasters,
    ensure_schema,
)


def _event(stream: str, n: int = 0, etype: str = "Thing", version: int = 1) -> NewEvent:
    return NewEvent(
        aggregate="thing",
        aggregate_id=stream,
        event_type=etype,
        schema_version=version,
        payload={"n": n},
    )


@pytest.fixture
async def store(database_url: str) -> EventStore:
    pool = await db.create_pool(database_url, max_size=20)
    async with pool.acquire() as conn:
        await ensure_schema(conn, "svc")
    yield EventStore(pool, "svc")
    await pool.close()


async def test_append_and_read_stream(store: EventStore) -> None:
    stored = await store.append([_event("a", 1), _event("a", 2)], expected_version=0)
    assert [e.version for e in stored] == [1, 2]
    assert all(e.position > 0 for e in stored)
    events = await store.read_stream("thing:a")
    assert [(e.version, e.payload["n"]) for e in events] == [(1, 1), (2, 2)]
    assert events[0].event_id == stored[0].event_id
    # the outbox got one row per event, in the same statement
    async with store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM svc.outbox") == 2


async def test_read_streams_reads_several_in_one_query(store: EventStore) -> None:
    await store.append_streams([([_event("a", 1), _event("a", 2)], 0), ([_event("b", 3)], 0)])
    events = await store.read_streams(["thing:b", "thing:none", "thing:a"])
    assert list(events) == ["thing:b", "thing:none", "thing:a"]
    assert [(e.version, e.payload["n"]) for e in events["thing:a"]] == [(1, 1), (2, 2)]
    assert [e.payload["n"] for e in events["thing:b"]] == [3]
    assert events["thing:none"] == []


async def test_messages_go_to_the_outbox_with_their_headers(store: EventStore) -> None:
    ids = [uuid.uuid4(), uuid.uuid4()]
    await store.append_streams(
        [([_event("a", 1)], 0)],
        messages=[
            OutboxMessage("work.a", b"one", ids[0], {"X-Kind": "a"}),
            OutboxMessage("work.b", b"two", ids[1]),
        ],
    )
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT event_id, subject, headers, body FROM svc.outbox "
            "WHERE subject LIKE 'work.%' ORDER BY subject"
        )
    assert [(r["event_id"], r["subject"], bytes(r["body"])) for r in rows] == [
        (ids[0], "work.a", b"one"),
        (ids[1], "work.b", b"two"),
    ]
    headers = [json.loads(r["headers"]) for r in rows]
    assert headers == [
        {"X-Kind": "a", "Nats-Msg-Id": str(ids[0])},
        {"Nats-Msg-Id": str(ids[1])},
    ]


async def test_side_writes_go_with_the_append_or_not_at_all(store: EventStore) -> None:
    async with store.pool.acquire() as conn:
        await conn.execute("CREATE TABLE svc.side (k text PRIMARY KEY, n int, b bytea)")
    cols = (("k", "text"), ("n", "int"), ("b", "bytea"))
    ids = [uuid.uuid4(), uuid.uuid4()]
    await store.append_streams(
        [([_event("a", 1)], 0)],
        messages=[OutboxMessage("work.a", b"one", ids[0])],
        rows=[RowsInsert("svc.side", cols, [("x", 1, b"\x00"), ("y", 2, b"")])],
    )
    # A stale version: the events, the message and the rows are all left out.
    with pytest.raises(ConcurrencyError):
        await store.append_streams(
            [([_event("a", 2)], 0)],
            messages=[OutboxMessage("work.b", b"two", ids[1])],
            rows=[RowsInsert("svc.side", cols, [("z", 3, b"")])],
        )
    async with store.pool.acquire() as conn:
        side = await conn.fetch("SELECT k, n, b FROM svc.side ORDER BY k")
        subjects = await conn.fetch("SELECT subject FROM svc.outbox ORDER BY position")
    assert [(r["k"], r["n"], bytes(r["b"])) for r in side] == [("x", 1, b"\x00"), ("y", 2, b"")]
    assert sorted(r["subject"] for r in subjects) == ["events.svc.thing.a", "work.a"]
    assert len(await store.read_stream("thing:a")) == 1


async def test_stale_expected_version_is_a_typed_error(store: EventStore) -> None:
    await store.append([_event("a")], expected_version=0)
    with pytest.raises(ConcurrencyError):
        await store.append([_event("a")], expected_version=0)  # duplicate version
    with pytest.raises(ConcurrencyError):
        await store.append([_event("a")], expected_version=5)  # would leave a gap
    assert [e.version for e in await store.read_stream("thing:a")] == [1]
    async with store.pool.acquire() as conn:  # nothing half-written
        assert await conn.fetchval("SELECT count(*) FROM svc.outbox") == 1


async def test_concurrent_writers_on_one_stream_exactly_one_wins_each_version(
    store: EventStore,
) -> None:
    writers, rounds = 16, 5
    for _round in range(rounds):
        current = len(await store.read_stream("thing:hot"))

        async def attempt(i: int, current: int = current) -> bool:
            try:
                await store.append([_event("hot", i)], expected_version=current)
                return True
            except ConcurrencyError:
                return False

        results = await asyncio.gather(*(attempt(i) for i in range(writers)))
        assert sum(results) == 1, results
    events = await store.read_stream("thing:hot")
    assert [e.version for e in events] == list(range(1, rounds + 1))


async def test_read_all_never_skips_a_late_commit(store: EventStore, database_url: str) -> None:
    """A transaction that took its position first but commits last must not be skipped
    by a reader that already moved past later positions."""
    slow = await db.connect(database_url)
    try:
        tx = slow.transaction()
        await tx.start()
        await store.append([_event("slow")], expected_version=0, conn=slow)  # lower position
        await store.append([_event("fast")], expected_version=0)  # higher position, committed
        seen = await store.read_all()
        # the committed one is held back while the older transaction is open
        assert [e.stream_id for e in seen] == []
        await tx.commit()
        seen = await store.read_all()
        assert sorted(e.stream_id for e in seen) == ["thing:fast", "thing:slow"]
        # a reader resuming from its cursor sees each event exactly once
        cursor = seen[0].position
        rest = await store.read_all(after_position=cursor)
        assert [e.event_id for e in rest] == [seen[1].event_id]
    finally:
        await slow.close()


async def test_concurrent_writers_reader_sees_every_event_once(store: EventStore) -> None:
    streams, per_stream = 20, 10
    seen: list[StoredEvent] = []
    done = asyncio.Event()

    async def write(stream: str) -> None:
        for n in range(per_stream):
            await store.append([_event(stream, n)], expected_version=n)

    async def read() -> None:
        cursor = 0
        while True:
            batch = await store.read_all(after_position=cursor, limit=7)
            seen.extend(batch)
            if batch:
                cursor = batch[-1].position
            elif done.is_set():
                final = await store.read_all(after_position=cursor)
                seen.extend(final)
                if not final:
                    return

    reader = asyncio.create_task(read())
    await asyncio.gather(*(write(f"s{i}") for i in range(streams)))
    done.set()
    await asyncio.wait_for(reader, 30)
    ids = [e.event_id for e in seen]
    assert len(ids) == len(set(ids)) == streams * per_stream
    for i in range(streams):
        versions = [e.version for e in seen if e.stream_id == f"thing:s{i}"]
        assert versions == list(range(1, per_stream + 1))


async def test_upcasters_apply_on_read(database_url: str) -> None:
    upcasters = Upcasters()

    @upcasters.register("Renamed", 1)
    def v1_to_v2(payload: dict[str, object]) -> dict[str, object]:
        return {"count": payload["n"], "unit": "pcs"}

    @upcasters.register("Renamed", 2)
    def v2_to_v3(payload: dict[str, object]) -> dict[str, object]:
        return {**payload, "unit": str(payload["unit"]).upper()}

    pool = await db.create_pool(database_url)
    async with pool.acquire() as conn:
        await ensure_schema(conn, "up")
    store = EventStore(pool, "up", upcasters)
    await store.append([_event("x", 7, etype="Renamed", version=1)], expected_version=0)
    (event,) = await store.read_stream("thing:x")
    assert event.schema_version == 3
    assert event.payload == {"count": 7, "unit": "PCS"}
    async with pool.acquire() as conn:  # the stored row is never rewritten
        raw = await conn.fetchrow("SELECT schema_version, payload FROM up.events")
    assert raw["schema_version"] == 1 and raw["payload"] == {"n": 7}
    (event,) = await store.read_all()
    assert event.schema_version == 3
    await pool.close()


async def test_event_ids_are_unique(store: EventStore) -> None:
    ev = _event("a")
    await store.append([ev], expected_version=0)
    dup = NewEvent(
        aggregate="thing",
        aggregate_id="b",
        event_type="Thing",
        schema_version=1,
        payload={},
        event_id=ev.event_id,
    )
    with pytest.raises((ConcurrencyError, asyncpg.UniqueViolationError)):
        await store.append([dup], expected_version=0)
    assert uuid.UUID(str(ev.event_id))


def test_an_aggregate_may_not_reuse_the_version_attribute() -> None:
    from shipyard_core.aggregate import Aggregate, DomainEvent

    class Bumped(DomainEvent):
        to: int

    class Careless(Aggregate):
        aggregate_type = "careless"

        def apply(self, event: DomainEvent) -> None:
            assert isinstance(event, Bumped)
            self.version = event.to  # the bug this guards against

    with pytest.raises(TypeError, match="changed `version`"):
        Careless("x").emit(Bumped(to=7))
