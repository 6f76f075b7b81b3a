"""The logging service end to end on real NATS and PostgreSQL: LOGS batches in, gRPC
queries out."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from shipyard.logging.v1 import logging_pb2 as pb
from shipyard_core import bus
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_core.logbatch import MAX_LINE_BYTES, LogBatch, split_lines
from shipyard_testing import wait_for

from .conftest import (
    Bus,
    Server,
    batch,
    logging_settings,
    md,
    start_server,
    stop_server,
    tail,
    wait_stored,
)

A = "iris-r1-aaaaa"
B = "iris-r1-bbbbb"


async def test_two_replicas_come_back_separated_and_in_order(server: Server, nats_bus: Bus) -> None:
    await nats_bus.created("iris", "team-a")
    pos = {A: 0, B: 0}
    for round_ in range(3):
        for instance in (A, B):
            texts = [f"{instance} line {round_}.{i}" for i in range(5)]
            b = batch(instance, texts, start=pos[instance])
            pos[instance] = b.end
            await nats_bus.publish(b)
    await wait_stored(server, 30)
    await wait_for(lambda: server.owners_known("iris"), message="owner never projected")

    for instance in (A, B):
        lines = await tail(server.stub, "ana", "iris", instance)
        assert [ln.text for ln in lines] == [
            f"{instance} line {r}.{i}" for r in range(3) for i in range(5)
        ]
        assert {ln.instance for ln in lines} == {instance}
        assert [ln.offset for ln in lines] == sorted(ln.offset for ln in lines)
        assert all(ln.stream == pb.LOG_STREAM_OUTPUT and ln.revision == 1 for ln in lines)

    everything = await tail(server.stub, "ana", "iris")
    assert len(everything) == 30
    for instance in (A, B):
        mine = [ln.text for ln in everything if ln.instance == instance]
        assert mine == [f"{instance} line {r}.{i}" for r in range(3) for i in range(5)]

    sources = await server.stub.ListLogSources(
        pb.ListLogSourcesRequest(deployment="iris"), metadata=md("ana")
    )
    assert sorted((s.instance, s.lines) for s in sources.sources) == [(A, 15), (B, 15)]


async def test_tail_defaults_to_the_last_2000_lines(server: Server, nats_bus: Bus) -> None:
    await nats_bus.created("iris", "team-a")
    pos = 0
    for chunk in range(5):
        b = batch(A, [f"line {chunk * 500 + i}" for i in range(500)], start=pos)
        pos = b.end
        await nats_bus.publish(b)
    await wait_stored(server, 2500)
    await wait_for(lambda: server.owners_known("iris"), message="owner never projected")

    lines = await tail(server.stub, "ana", "iris", A)
    assert len(lines) == 2000
    assert lines[0].text == "line 500" and lines[-1].text == "line 2499"
    whole = await tail(server.stub, "ana", "iris")
    assert [ln.text for ln in whole] == [ln.text for ln in lines]
    last = await tail(server.stub, "ana", "iris", A, limit=3)
    assert [ln.text for ln in last] == ["line 2497", "line 2498", "line 2499"]
    found = await tail(server.stub, "ana", "iris", A, grep="LINE 249")
    assert [ln.text for ln in found][:2] == ["line 249", "line 2490"]
    assert len(found) == 11


async def test_time_range_and_download(server: Server, nats_bus: Bus) -> None:
    await nats_bus.created("iris", "team-a")
    now = datetime.now(UTC).replace(microsecond=0)
    early = batch(A, [f"early {i}" for i in range(3000)], at=now - timedelta(hours=2))
    late = batch(A, ["late 0", "late 1"], start=early.end, at=now)
    await nats_bus.publish(early)
    await nats_bus.publish(late)
    await wait_stored(server, 3002)
    await wait_for(lambda: server.owners_known("iris"), message="owner never projected")

    recent = await tail(server.stub, "ana", "iris", A, since=to_timestamp(now - timedelta(hours=1)))
    assert [ln.text for ln in recent] == ["late 0", "late 1"]
    before = await tail(server.stub, "ana", "iris", until=to_timestamp(now), limit=2)
    assert [ln.text for ln in before] == ["early 2998", "early 2999"]

    got = [
        ln.text
        async for chunk in server.stub.DownloadLogs(
            pb.DownloadLogsRequest(deployment="iris", instance=A), metadata=md("ana")
        )
        for ln in chunk.lines
    ]
    assert got == [f"early {i}" for i in range(3000)] + ["late 0", "late 1"]


async def test_follow_streams_new_lines_as_they_arrive(server: Server, nats_bus: Bus) -> None:
    await nats_bus.created("iris", "team-a")
    first = batch(A, ["before"])
    await nats_bus.publish(first)
    await wait_stored(server, 1)
    await wait_for(lambda: server.owners_known("iris"), message="owner never projected")

    call = server.stub.FollowLogs(
        pb.FollowLogsRequest(filter=pb.LogFilter(deployment="iris"), tail=5), metadata=md("ana")
    )
    seen: list[str] = []

    async def read() -> None:
        async for chunk in call:
            seen.extend(ln.text for ln in chunk.lines)
            if "after 2" in seen:
                return

    reader = asyncio.create_task(read())
    await wait_for(lambda: seen == ["before"], message="backlog never came")
    await nats_bus.publish(batch(A, ["after 1", "after 2"], start=first.end))
    await asyncio.wait_for(reader, 20)
    call.cancel()
    assert seen == ["before", "after 1", "after 2"]


async def test_a_restart_loses_nothing_and_stores_nothing_twice(
    database_url: str, nats_url: str, nats_bus: Bus
) -> None:
    await nats_bus.created("iris", "team-a")
    settings = logging_settings(database_url, nats_url)
    server = await start_server(settings)
    one = batch(A, [f"one {i}" for i in range(100)])
    await nats_bus.publish(one)
    await wait_stored(server, 100)
    await stop_server(server)

    # While the service is down: the next batches arrive out of order, and a shipper that
    # restarted re-sends a range overlapping what is stored (another Nats-Msg-Id).
    two = batch(A, [f"two {i}" for i in range(100)], start=one.end)
    three = batch(A, [f"three {i}" for i in range(100)], start=two.end)
    await nats_bus.publish(three)
    await nats_bus.publish(two)
    overlap = LogBatch(
        "instance", A, "iris", 1, "output", one.start, two.end, one.lines + two.lines
    )
    await nats_bus.publish(overlap)

    server = await start_server(settings)
    try:
        await wait_stored(server, 300)
        await wait_for(lambda: _drained(server), timeout=20, message="the consumer never caught up")
        assert await server.lines_stored() == 300
        await wait_for(lambda: server.owners_known("iris"), message="owner never projected")
        lines = await tail(server.stub, "ana", "iris", A)
        expected = [f"{w} {i}" for w in ("one", "two", "three") for i in range(100)]
        assert [ln.text for ln in lines] == expected
        assert server.service.ingester.stats.gaps == 0
    finally:
        await stop_server(server)


async def _drained(server: Server) -> bool:
    return await server.service.ingester.pending() == 0


async def test_odd_bytes_and_very_long_lines_are_kept_safely(server: Server, nats_bus: Bus) -> None:
    await nats_bus.created("iris", "team-a")
    long_line = b"x" * (MAX_LINE_BYTES * 2 + 10)
    raw = b"caf\xc3\xa9 ok\nbad \xff\xfe bytes\nnul\x00here\r\n" + long_line + b"\nend\n"
    lines, end = split_lines(raw, 0, datetime.now(UTC))
    assert end == len(raw)
    await nats_bus.publish(LogBatch("instance", A, "iris", 1, "output", 0, end, lines))
    await wait_stored(server, 7)
    await wait_for(lambda: server.owners_known("iris"), message="owner never projected")

    got = await tail(server.stub, "ana", "iris", A)
    assert [ln.text for ln in got[:3]] == ["café ok", "bad \ufffd\ufffd bytes", "nul\ufffdhere"]
    pieces = got[3:6]
    assert [len(p.text) for p in pieces] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]
    assert [p.cut for p in pieces] == [True, True, False]
    assert got[6].text == "end" and not got[6].cut

    # A message that is no batch at all is parked on the DLQ, and ingest goes on.
    await nats_bus.js.publish("logs.instance.iris.junk", b"\xff not json", stream="LOGS")
    await nats_bus.publish(batch(A, ["after junk"], start=end))
    await wait_stored(server, 8)
    await wait_for(lambda: server.service.ingester.dead_lettered == 1, message="no DLQ")
    dlq = await nats_bus.js.stream_info("DLQ")
    assert dlq.state.messages == 1

    # 100 lines of 16 KiB of invalid bytes are 4.8 MB of U+FFFD: more than gRPC's default
    # message limit, so the answer comes in several messages.
    junk = (b"\xff" * MAX_LINE_BYTES + b"\n") * 100
    pos = end + len(b"after junk\n")
    while junk:
        chunk, junk = junk[: 8 * (MAX_LINE_BYTES + 1)], junk[8 * (MAX_LINE_BYTES + 1) :]
        lines, after = split_lines(chunk, pos, datetime.now(UTC))
        await nats_bus.publish(LogBatch("instance", A, "iris", 1, "output", pos, after, lines))
        pos = after
    await wait_stored(server, 108)
    many = await tail(server.stub, "ana", "iris", A, limit=100)
    assert len(many) == 100 and all(ln.text == "\ufffd" * MAX_LINE_BYTES for ln in many)


async def test_retention_drops_old_days(server: Server, nats_bus: Bus) -> None:
    await nats_bus.created("iris", "team-a")
    now = datetime.now(UTC)
    old = batch(A, ["two days ago"], at=now - timedelta(days=2))
    new = batch(B, ["today"], at=now)
    ancient = batch("iris-r1-ccccc", ["past the retention"], at=now - timedelta(days=4))
    for b in (old, new, ancient):
        await nats_bus.publish(b)
    await wait_stored(server, 2)
    await wait_for(lambda: server.service.ingester.stats.expired == 1, message="not skipped")

    ingester = server.service.ingester
    ingester.clock = lambda: now + timedelta(days=2)
    async with server.service.svc.pool.acquire() as conn:
        dropped = await ingester.drop_expired(conn)
    assert len(dropped) == 1
    await wait_for(lambda: server.owners_known("iris"), message="owner never projected")
    assert [ln.text for ln in await tail(server.stub, "ana", "iris")] == ["today"]
    sources = await server.stub.ListLogSources(
        pb.ListLogSourcesRequest(deployment="iris"), metadata=md("ana")
    )
    assert [s.instance for s in sources.sources] == [B]
    stream = await nats_bus.js.stream_info("LOGS")
    assert stream.config.max_age == pytest.approx(3 * 24 * 3600)


async def test_a_group_reads_only_its_own_deployments_logs(server: Server, nats_bus: Bus) -> None:
    await nats_bus.created("iris", "team-a")
    await nats_bus.publish(batch(A, ["team-a's secret"]))
    await wait_stored(server, 1)
    await wait_for(lambda: server.owners_known("iris"), message="owner never projected")

    for call in (
        lambda: tail(server.stub, "bob", "iris"),
        lambda: tail(server.stub, "bob", "iris", A),
        lambda: server.stub.ListLogSources(
            pb.ListLogSourcesRequest(deployment="iris"), metadata=md("bob")
        ),
        lambda: tail(server.stub, "bob", "nothing-here"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "does not exist" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in server.stub.DownloadLogs(
            pb.DownloadLogsRequest(deployment="iris", instance=A), metadata=md("bob")
        ):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert [ln.text for ln in await tail(server.stub, "admin", "iris")] == ["team-a's secret"]

    # Deleted, then created again by team-b: each group reads its own life only.
    await nats_bus.scheduler_event("iris", "DeploymentDeleted")
    await nats_bus.created("iris", "team-b", revision=2)
    await nats_bus.publish(batch("iris-r2-ddddd", ["team-b's line"], revision=2))
    await wait_stored(server, 2)

    async def two_lives() -> bool:
        n = await server.service.svc.pool.fetchval("SELECT count(*) FROM logging.deployment_lives")
        return bool(n == 2)

    await wait_for(two_lives, message="second life never projected")
    assert [ln.text for ln in await tail(server.stub, "ana", "iris")] == ["team-a's secret"]
    assert [ln.text for ln in await tail(server.stub, "bob", "iris")] == ["team-b's line"]
    assert len(await tail(server.stub, "admin", "iris")) == 2


async def test_bad_requests_name_the_field(server: Server) -> None:
    cases = [
        (pb.TailLogsRequest(filter=pb.LogFilter(deployment="iris"), limit=-1), "limit"),
        (pb.TailLogsRequest(filter=pb.LogFilter(deployment="Bad_Name")), "deployment"),
        (pb.TailLogsRequest(filter=pb.LogFilter()), "deployment"),
        (
            pb.TailLogsRequest(
                filter=pb.LogFilter(
                    deployment="iris",
                    since=to_timestamp(datetime(2030, 1, 2, tzinfo=UTC)),
                    until=to_timestamp(datetime(2030, 1, 1, tzinfo=UTC)),
                )
            ),
            "until",
        ),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in server.stub.TailLogs(request, metadata=md("ana")):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"{field}:")


async def test_only_the_logging_service_sets_the_retention_of_logs(
    database_url: str, nats_url: str, nats_bus: Bus
) -> None:
    five_days = 5 * 24 * 3600.0
    settings = logging_settings(database_url, nats_url, logs_retention_seconds=five_days)
    server = await start_server(settings)
    try:
        # Every other service ensures the streams too, without a retention of its own.
        await bus.ensure_streams(nats_bus.js)
        info = await nats_bus.js.stream_info(bus.LOGS_STREAM)
        assert info.config.max_age == pytest.approx(five_days)
    finally:
        await stop_server(server)
