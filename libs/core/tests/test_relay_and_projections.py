"""Outbox relay, projection runner, dead letters and replay on real NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shipyard_core import bus, db
from shipyard_core.eventstore import EventStore, OutboxMessage, StoredEvent, ensure_schema
from shipyard_core.outbox import OutboxRelay
from shipyard_core.projections import ProjectionRunner, replay_projection
from shipyard_testing import wait_for
from shipyard_testing.sample import SERVICE, CounterProjection, thing


@dataclass
class Kit:
    dsn: str
    nats_url: str
    pool: asyncpg.Pool
    store: EventStore
    nc: NATS
    js: JetStreamContext
    tasks: list[asyncio.Task[None]]
    stop: asyncio.Event

    def start(self, coro_fn: Callable[[asyncio.Event], object]) -> None:
        self.tasks.append(asyncio.create_task(coro_fn(self.stop)))  # type: ignore[arg-type]

    async def totals(self) -> dict[str, tuple[int, int]]:
        rows = await self.pool.fetch(f"SELECT stream_id, total, events FROM {SERVICE}.counters")
        return {r["stream_id"]: (r["total"], r["events"]) for r in rows}


@pytest.fixture
async def kit(database_url: str, nats_url: str) -> AsyncIterator[Kit]:
    pool = await db.create_pool(database_url, max_size=20)
    async with pool.acquire() as conn:
        await ensure_schema(conn, SERVICE)
    nc = await bus.connect(nats_url, "test")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    k = Kit(database_url, nats_url, pool, EventStore(pool, SERVICE), nc, js, [], asyncio.Event())
    yield k
    k.stop.set()
    for t in k.tasks:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(t, 10)
    await nc.close()
    await pool.close()


async def _stream_events(js: JetStreamContext) -> list[StoredEvent]:
    """Everything on the EVENTS stream, through a fresh consumer."""
    info = await js.stream_info(bus.EVENTS_STREAM)
    total = info.state.messages
    sub = await js.pull_subscribe(
        "events.>",
        durable=None,
        stream=bus.EVENTS_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
    )
    out: list[StoredEvent] = []
    while len(out) < total:
        msgs = await sub.fetch(min(500, total - len(out)), timeout=5)
        out += [StoredEvent.decode(m.data) for m in msgs]
    await sub.unsubscribe()
    return out


def _assert_exactly_once_in_order(published: list[StoredEvent], stored: list[StoredEvent]) -> None:
    ids = [e.event_id for e in published]
    assert len(ids) == len(set(ids)), "an event was published twice"
    assert set(ids) == {e.event_id for e in stored}, "an event is missing"
    per_stream: dict[str, list[int]] = defaultdict(list)
    for e in published:
        per_stream[e.stream_id].append(e.version)
    for stream, versions in per_stream.items():
        assert versions == sorted(versions), f"{stream} out of order: {versions}"


async def test_relay_delivers_every_event_exactly_once_in_order(kit: Kit) -> None:
    relay = OutboxRelay(kit.dsn, kit.js, SERVICE)
    kit.start(relay.run)
    writers, per_writer = 12, 40

    async def writer(i: int) -> None:
        for n in range(per_writer):
            await kit.store.append([thing(f"w{i}", n)], expected_version=n)

    await asyncio.gather(*(writer(i) for i in range(writers)))

    async def published() -> bool:
        info = await kit.js.stream_info(bus.EVENTS_STREAM)
        return info.state.messages >= writers * per_writer

    await wait_for(published, timeout=30, message="relay did not publish everything")
    events = await _stream_events(kit.js)
    _assert_exactly_once_in_order(events, await kit.store.read_all(limit=100_000))
    async with kit.pool.acquire() as conn:
        assert await relay.pending(conn) == 0


async def test_projection_applies_and_replay_rebuilds_equal_tables(kit: Kit) -> None:
    kit.start(OutboxRelay(kit.dsn, kit.js, SERVICE).run)
    runner = ProjectionRunner(CounterProjection(), kit.dsn, kit.js)
    kit.start(runner.run)
    for i in range(30):
        await kit.store.append([thing(f"s{i % 5}", i)], expected_version=i // 5)
    expected = {f"thing:s{k}": (sum(range(k, 30, 5)), 6) for k in range(5)}

    await wait_for(lambda: _eq(kit.totals, expected), timeout=30, message="projection lagged")
    async with kit.pool.acquire() as conn:
        lag = await runner.lag(conn)
    assert lag.pending == 0 and lag.applied == 30 and lag.dead_lettered == 0

    check = await replay_projection(CounterProjection(), kit.pool, swap=False)
    assert check.equal, check.differences
    assert check.events == 30 and not check.swapped
    # Corrupt the live table: the check must now see it.
    await kit.pool.execute(
        f"UPDATE {SERVICE}.counters SET total = total + 1 WHERE stream_id = 'thing:s0'"
    )
    broken = await replay_projection(CounterProjection(), kit.pool, swap=False)
    assert not broken.equal and any("s0" in d for d in broken.differences)

    swapped = await replay_projection(CounterProjection(), kit.pool)
    assert swapped.swapped and swapped.events_per_second > 0
    assert await kit.totals() == expected  # repaired by the rebuild
    # The live runner keeps working on the swapped-in table, without double counting.
    await kit.store.append([thing("s0", 100)], expected_version=6)
    expected["thing:s0"] = (expected["thing:s0"][0] + 100, 7)
    await wait_for(lambda: _eq(kit.totals, expected), timeout=30, message="no update after swap")
    again = await replay_projection(CounterProjection(), kit.pool, swap=False)
    assert again.equal, again.differences


async def _eq(fn: Callable[[], object], expected: object) -> bool:
    return await fn() == expected  # type: ignore[misc]


async def test_poison_event_is_dead_lettered_and_the_projection_moves_on(kit: Kit) -> None:
    kit.start(OutboxRelay(kit.dsn, kit.js, SERVICE).run)
    runner = ProjectionRunner(
        CounterProjection(), kit.dsn, kit.js, max_attempts=3, retry_delay=0.01
    )
    kit.start(runner.run)
    await kit.store.append([thing("p", 1)], expected_version=0)
    await kit.store.append([thing("p", 0, poison=True)], expected_version=1)
    await kit.store.append([thing("p", 5)], expected_version=2)
    await kit.store.append([thing("q", 2)], expected_version=0)
    want = {"thing:p": (6, 2), "thing:q": (2, 1)}
    await wait_for(lambda: _eq(kit.totals, want), timeout=30, message="stuck behind poison")

    dlq = await kit.js.stream_info(bus.DLQ_STREAM)
    assert dlq.state.messages == 1
    msg = await kit.js.get_last_msg(bus.DLQ_STREAM, f"dlq.{SERVICE}.counters")
    assert StoredEvent.decode(msg.data).version == 2
    assert "poison payload" in (msg.headers or {}).get("Shipyard-Error", "")
    assert (msg.headers or {}).get("Shipyard-Deliveries") == "3"
    async with kit.pool.acquire() as conn:
        assert (await runner.lag(conn)).dead_lettered == 1


@pytest.mark.parametrize("runner_first", [True, False], ids=["trickle", "one-batch"])
async def test_out_of_order_delivery_waits_for_the_gap(kit: Kit, runner_first: bool) -> None:
    """If v2 reaches the runner before v1 (a relay retry), v2 waits instead of being lost,
    whether v1 comes in a later fetch or later in the same batch."""
    runner = ProjectionRunner(CounterProjection(), kit.dsn, kit.js, retry_delay=0.05)
    if runner_first:
        kit.start(runner.run)
    stored = await kit.store.append([thing("g", 1), thing("g", 10)], expected_version=0)
    await kit.store.append([thing("h", 5)], expected_version=0)
    for ev in reversed(stored):  # publish by hand, newest first
        await kit.js.publish(ev.subject, ev.encode(), headers={"Nats-Msg-Id": str(ev.event_id)})
    if not runner_first:
        kit.start(runner.run)
    await wait_for(
        lambda: _eq(kit.totals, {"thing:g": (11, 2)}),
        timeout=30,
        message="gap not filled",
        ignore=(asyncpg.UndefinedTableError,),
    )


def _spawn(role: str, kit: Kit) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "shipyard_testing.sample", role, kit.dsn, kit.nats_url],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_kill_9_of_relay_and_projection_loses_nothing_and_applies_nothing_twice(
    kit: Kit,
) -> None:
    relay = _spawn("relay", kit)
    proj = _spawn("projection", kit)
    procs = [relay, proj]
    try:
        streams, per_stream = 10, 60
        versions = dict.fromkeys(range(streams), 0)

        async def write(count: int) -> None:
            for _ in range(count):
                for s in range(streams):
                    await kit.store.append([thing(f"k{s}", 1)], expected_version=versions[s])
                    versions[s] += 1

        async def applied() -> int:
            return int(
                await kit.pool.fetchval(f"SELECT coalesce(sum(events), 0) FROM {SERVICE}.counters")
                or 0
            )

        await write(20)
        await wait_for(
            lambda: _gt(applied, 50),
            timeout=60,
            message="projection did not start",
            ignore=(asyncpg.UndefinedTableError,),
        )
        os.kill(relay.pid, signal.SIGKILL)
        os.kill(proj.pid, signal.SIGKILL)
        relay.wait()
        proj.wait()
        await write(20)  # accepted while both are dead
        relay, proj = _spawn("relay", kit), _spawn("projection", kit)
        procs += [relay, proj]
        await write(10)
        # and once more, while they are busy catching up
        os.kill(proj.pid, signal.SIGKILL)
        proj.wait()
        proj = _spawn("projection", kit)
        procs.append(proj)
        await write(10)
        want = {f"thing:k{s}": (per_stream, per_stream) for s in range(streams)}
        await wait_for(lambda: _eq(kit.totals, want), timeout=90, message="lost or doubled events")
        events = await _stream_events(kit.js)
        _assert_exactly_once_in_order(events, await kit.store.read_all(limit=100_000))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)


async def _gt(fn: Callable[[], object], n: int) -> bool:
    return await fn() > n  # type: ignore[misc, operator]


async def test_a_batch_in_the_wrong_order_is_applied_in_stream_order(kit: Kit) -> None:
    """The runner's batch step itself: [v2, v1, v3 of another gap] in one transaction
    applies v1 then v2, and sends back only what truly waits for a missing event."""
    from shipyard_core.projections.runner import _Item

    runner = ProjectionRunner(CounterProjection(), kit.dsn, kit.js)
    events = await kit.store.append(
        [thing("b", 1), thing("b", 2), thing("b", 4)], expected_version=0
    )
    lonely = await kit.store.append([thing("c", 1), thing("c", 8)], expected_version=0)
    items = [_Item(None, e) for e in (events[1], events[0], lonely[1])]  # type: ignore[arg-type]
    conn = await db.connect(kit.dsn)
    try:
        await CounterProjection.create_tables(conn)
        done, rest = await runner._apply(conn, items)
    finally:
        await conn.close()
    assert [i.event.version for i in done] == [1, 2]
    assert [(i.event.stream_id, i.event.version) for i in rest] == [("thing:c", 2)]
    assert await kit.totals() == {"thing:b": (3, 2)}


async def test_an_append_wakes_its_own_relay_only(kit: Kit) -> None:
    """Appends NOTIFY their service's relay at once (it does not wait for its poll), and
    a relay of another service is not woken by them."""
    other_schema = f"{SERVICE}_other"
    async with kit.pool.acquire() as conn:
        await ensure_schema(conn, other_schema)
    relay = OutboxRelay(kit.dsn, kit.js, SERVICE, poll_interval=60)
    other = OutboxRelay(kit.dsn, kit.js, other_schema, poll_interval=60)
    woken: list[str] = []
    for r in (relay, other):
        wake = r._wake
        original = wake.set

        def counting(original: Callable[[], None] = original, name: str = r.service) -> None:
            woken.append(name)
            original()

        wake.set = counting  # type: ignore[method-assign]
    kit.start(relay.run)
    kit.start(other.run)

    async def published(n: int) -> bool:
        info = await kit.js.stream_info(bus.EVENTS_STREAM)
        return bool(info.state.messages >= n)

    # One event each, relayed by the relays' first look: from then on both listen.
    await kit.store.append([thing("woken", 0)], expected_version=0)
    await EventStore(kit.pool, other_schema).append([thing("other", 0)], expected_version=0)
    await wait_for(lambda: published(2), timeout=10, message="the relays never started")
    woken.clear()
    for n in range(1, 6):
        await kit.store.append([thing("woken", n)], expected_version=n)
    # Well within the 60 s poll: only a NOTIFY can have woken it.
    await wait_for(lambda: published(7), timeout=10, message="the relay was not woken")
    assert woken and set(woken) == {SERVICE}, woken


async def test_a_message_sent_with_events_leaves_with_its_transaction_only(kit: Kit) -> None:
    kit.start(OutboxRelay(kit.dsn, kit.js, SERVICE, poll_interval=60).run)
    await kit.js.add_stream(name="WORK", subjects=["work.>"])
    kept, dropped = uuid.uuid4(), uuid.uuid4()
    async with kit.pool.acquire() as conn:
        with contextlib.suppress(RuntimeError):
            async with conn.transaction():
                await kit.store.append_streams(
                    [([thing("dropper", 0)], 0)],
                    conn=conn,
                    messages=[OutboxMessage("work.items", b"dropped", dropped)],
                )
                raise RuntimeError("the command failed: nothing may leave")
        async with conn.transaction():
            await kit.store.append_streams(
                [([thing("sender", 0)], 0)],
                conn=conn,
                messages=[OutboxMessage("work.items", b"kept", kept, {"x-kind": "item"})],
            )

    async def delivered() -> list[Any]:
        info = await kit.js.stream_info("WORK")
        if info.state.messages < 1:
            return []
        return [await kit.js.get_msg("WORK", seq) for seq in range(1, info.state.messages + 1)]

    msgs = await wait_for(delivered, timeout=10, message="the message never left")
    assert [m.data for m in msgs] == [b"kept"]
    assert msgs[0].headers is not None
    assert msgs[0].headers["Nats-Msg-Id"] == str(kept) and msgs[0].headers["x-kind"] == "item"


class _WiderCounter(CounterProjection):
    """The counters projection of a later release, which also follows ``gadget``."""

    sources = ((SERVICE, "thing"), (SERVICE, "gadget"))


async def test_a_projection_that_follows_a_new_aggregate_gets_its_events(kit: Kit) -> None:
    """An upgrade: the consumer the previous release created follows ``thing`` only; the
    new release's runner widens it in place, keeping its position, and the new
    aggregate's events are projected."""
    kit.start(OutboxRelay(kit.dsn, kit.js, SERVICE).run)
    old = ProjectionRunner(CounterProjection(), kit.dsn, kit.js)
    await old.ensure_consumer()
    before = await kit.js.consumer_info(bus.EVENTS_STREAM, old.durable)
    assert set(before.config.filter_subjects or [before.config.filter_subject]) == {
        f"events.{SERVICE}.thing.*"
    }

    runner = ProjectionRunner(_WiderCounter(), kit.dsn, kit.js)
    await runner.ensure_consumer()
    after = await kit.js.consumer_info(bus.EVENTS_STREAM, runner.durable)
    assert set(after.config.filter_subjects or []) == {
        f"events.{SERVICE}.thing.*",
        f"events.{SERVICE}.gadget.*",
    }
    kit.start(runner.run)
    gadget = thing("g1", 7)
    gadget = dataclasses.replace(gadget, aggregate="gadget")
    await kit.store.append([thing("t1", 2)], expected_version=0)
    await kit.store.append([gadget], expected_version=0)
    expected = {"thing:t1": (2, 1), "gadget:g1": (7, 1)}
    await wait_for(
        lambda: _eq(kit.totals, expected),
        timeout=30,
        message="gadget projected",
        ignore=(asyncpg.UndefinedTableError,),  # before the runner created its table
    )
    # An older replica starting up again does not narrow it back.
    await old.ensure_consumer()
    again = await kit.js.consumer_info(bus.EVENTS_STREAM, old.durable)
    assert set(again.config.filter_subjects or []) == set(after.config.filter_subjects or [])
