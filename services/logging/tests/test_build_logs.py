"""Image build logs in the logging service, on real NATS and PostgreSQL: LOGS batches of
kind ``build`` in, the same gRPC queries out (tail, grep, follow, download), for the
build's group and admins only."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from shipyard.logging.v1 import logging_pb2 as pb
from shipyard_core import bus
from shipyard_core.logbatch import Line, LogBatch, to_micros
from shipyard_testing import wait_for

from .conftest import Bus, Server, md, tail, wait_stored

BUILD = "b-0123456789abcdef"
OTHER = "b-fedcba9876543210"
NOT_FOUND = f"build {BUILD} does not exist; see `shipyard image builds`"


def build_batch(
    build_id: str,
    texts: list[str],
    *,
    first: int = 1,
    group: str = "team-a",
    image: str = "iris",
    at: datetime | None = None,
) -> LogBatch:
    """Lines ``first, first + 1, ...`` of a build as imagebuild publishes them: the line
    number is the offset, the first batch starts at position 0."""
    stamp = at or datetime.now(UTC)
    lines = [Line(first + i, stamp, text) for i, text in enumerate(texts)]
    start = 0 if first == 1 else first
    return LogBatch(
        "build", build_id, "", 0, "output", start, first + len(texts), lines, group, image
    )


async def build_tail(server: Server, token: str, build_id: str, **kw: object) -> list[pb.LogLine]:
    return await tail(server.stub, token, "", build_id=build_id, **kw)


async def download(server: Server, token: str, build_id: str) -> list[pb.LogLine]:
    request = pb.DownloadLogsRequest(build_id=build_id)
    return [
        line
        async for chunk in server.stub.DownloadLogs(request, metadata=md(token))
        for line in chunk.lines
    ]


async def _rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_a_builds_log_is_its_groups_and_the_admins_only(
    server: Server, nats_bus: Bus
) -> None:
    await nats_bus.publish(build_batch(BUILD, [f"step {i}" for i in range(1, 6)]))
    await nats_bus.publish(build_batch(BUILD, ["step 6", "done"], first=6))
    await wait_stored(server, 7)

    lines = await build_tail(server, "ana", BUILD)
    assert [ln.text for ln in lines] == [f"step {i}" for i in range(1, 7)] + ["done"]
    assert [ln.offset for ln in lines] == list(range(1, 8))  # the build's line numbers
    assert {(ln.build_id, ln.deployment, ln.instance) for ln in lines} == {(BUILD, "", "")}
    assert len(await build_tail(server, "admin", BUILD)) == 7

    # bob (team-b) gets what a build that does not exist gets, from every query.
    for call in (
        build_tail(server, "bob", BUILD),
        download(server, "bob", BUILD),
        build_tail(server, "bob", OTHER),  # one that really does not exist
    ):
        err = await _rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert (err.details() or "").startswith("build b-") and "does not exist" in (
            err.details() or ""
        )
    follow = server.stub.FollowLogs(
        pb.FollowLogsRequest(filter=pb.LogFilter(build_id=BUILD), tail=5), metadata=md("bob")
    )
    err = await _rpc_error(follow.read())
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details() == NOT_FOUND

    # Build lines are not a deployment's, and a deployment's query never shows them.
    assert await tail(server.stub, "admin", "iris") == []


async def test_tail_grep_follow_and_download_of_a_build(server: Server, nats_bus: Bus) -> None:
    seq = 1
    for chunk in range(5):
        texts = [f"line {chunk * 500 + i}" for i in range(500)]
        await nats_bus.publish(build_batch(BUILD, texts, first=seq))
        seq += len(texts)
    await wait_stored(server, 2500)

    lines = await build_tail(server, "ana", BUILD)  # default: the last 2000
    assert len(lines) == 2000
    assert lines[0].text == "line 500" and lines[-1].text == "line 2499"
    assert [ln.text for ln in await build_tail(server, "ana", BUILD, limit=3)] == [
        "line 2497",
        "line 2498",
        "line 2499",
    ]
    found = await build_tail(server, "ana", BUILD, grep="LINE 249")
    assert [ln.text for ln in found][:2] == ["line 249", "line 2490"] and len(found) == 11
    whole = await download(server, "ana", BUILD)
    assert [ln.text for ln in whole] == [f"line {i}" for i in range(2500)]

    call = server.stub.FollowLogs(
        pb.FollowLogsRequest(filter=pb.LogFilter(build_id=BUILD), tail=2), metadata=md("ana")
    )
    seen: list[str] = []

    async def read() -> None:
        async for chunk in call:
            seen.extend(ln.text for ln in chunk.lines)
            if "finished" in seen:
                return

    reader = asyncio.create_task(read())
    await wait_for(lambda: seen == ["line 2498", "line 2499"], message="backlog never came")
    # Another build's lines and an instance's do not reach this follow.
    await nats_bus.publish(build_batch(OTHER, ["not mine"]))
    await nats_bus.publish(build_batch(BUILD, ["installing", "finished"], first=seq))
    await asyncio.wait_for(reader, 20)
    call.cancel()
    assert seen == ["line 2498", "line 2499", "installing", "finished"]


async def test_batches_without_the_new_fields_still_ingest(server: Server, nats_bus: Bus) -> None:
    """A batch of the format before ``group`` and ``image`` (as an older shipper sends
    it): stored; a build whose batches named no group is the admins' until one does."""
    await nats_bus.created("iris", "team-a")
    now = to_micros(datetime.now(UTC))
    old_instance = {
        "v": 1,
        "kind": "instance",
        "source": "iris-r1-aaaaa",
        "deployment": "iris",
        "revision": 1,
        "stream": "output",
        "start": 0,
        "end": 6,
        "lines": [[0, now, "hello", False]],
    }
    old_build = {
        "v": 1,
        "kind": "build",
        "source": BUILD,
        "deployment": "",
        "revision": 0,
        "stream": "output",
        "start": 0,
        "end": 3,
        "lines": [[1, now, "first", False], [2, now, "second", False]],
    }
    for body in (old_instance, old_build):
        await nats_bus.js.publish(
            f"logs.{body['kind']}.{body['deployment'] or '-'}.{body['source']}",
            json.dumps(body).encode(),
            stream=bus.LOGS_STREAM,
        )
    await wait_stored(server, 3)
    await wait_for(lambda: server.owners_known("iris"), message="owner never projected")
    assert [ln.text for ln in await tail(server.stub, "ana", "iris")] == ["hello"]
    assert [ln.text for ln in await build_tail(server, "admin", BUILD)] == ["first", "second"]
    err = await _rpc_error(build_tail(server, "ana", BUILD))
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details() == NOT_FOUND
    assert server.service.ingester.dead_lettered == 0

    # The next batch names the group: from then on the group reads the whole log.
    await nats_bus.publish(build_batch(BUILD, ["third"], first=3))
    await wait_stored(server, 4)
    got = await build_tail(server, "ana", BUILD)
    assert [ln.text for ln in got] == ["first", "second", "third"]
    # A batch without the fields afterwards does not take the group away.
    later = build_batch(BUILD, ["fourth"], first=4, group="", image="")
    assert b'"group"' not in later.encode()
    await nats_bus.publish(later)
    await wait_stored(server, 5)
    assert len(await build_tail(server, "ana", BUILD)) == 4
    owner = await server.service.svc.pool.fetchrow(
        "SELECT group_name, image FROM logging.sources WHERE source = $1", BUILD
    )
    assert (owner["group_name"], owner["image"]) == ("team-a", "iris")


async def test_build_lines_expire_like_instance_lines(server: Server, nats_bus: Bus) -> None:
    now = datetime.now(UTC)
    await nats_bus.publish(build_batch(BUILD, ["two days ago"], at=now - timedelta(days=2)))
    await nats_bus.publish(build_batch(OTHER, ["today"], at=now))
    await wait_stored(server, 2)
    ingester = server.service.ingester
    ingester.clock = lambda: now + timedelta(days=2)
    async with server.service.svc.pool.acquire() as conn:
        assert len(await ingester.drop_expired(conn)) == 1
    err = await _rpc_error(build_tail(server, "ana", BUILD))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert [ln.text for ln in await build_tail(server, "ana", OTHER)] == ["today"]


async def test_a_build_filter_is_checked(server: Server) -> None:
    cases = [
        (pb.LogFilter(deployment="iris", build_id=BUILD), "build_id"),
        (pb.LogFilter(instance="iris-r1-aaaaa", build_id=BUILD), "build_id"),
        (pb.LogFilter(build_id="Not A Build"), "build_id"),
    ]
    for f, field in cases:
        err = await _rpc_error(
            tail_call(server, f),
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.details() or "").startswith(f"{field}:")


async def tail_call(server: Server, f: pb.LogFilter) -> None:
    async for _ in server.stub.TailLogs(pb.TailLogsRequest(filter=f), metadata=md("ana")):
        pass
