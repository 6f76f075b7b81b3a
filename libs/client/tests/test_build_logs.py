"""``shipyard image logs BUILD_OR_IMAGE`` and ``client.logs.build_log``: which service a
build's log is read from, and that the caller gets the whole answer either way (the
services themselves are tested end to end in services/imagebuild/tests and
services/logging/tests)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from shipyard.client import Client, NotFound
from shipyard.imagebuild.v1 import imagebuild_pb2 as ib
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc as ib_grpc
from shipyard.logging.v1 import logging_pb2 as lg
from shipyard.logging.v1 import logging_pb2_grpc as lg_grpc

from .conftest import free_port, run, serving, shipyard, write_config

BUILD = "b-00000000000000aa"
LINES = [f"step {i}" for i in range(1, 8)] + ["ERROR: no wheel for numpy", "failed"]
AT = Timestamp(seconds=1_700_000_000)


@dataclass
class FakeImageBuild(ib_grpc.ImageBuildServiceServicer):
    calls: list[str] = field(default_factory=list)

    async def GetImage(self, request: Any, context: Any) -> ib.Image:
        self.calls.append("GetImage")
        if request.image not in ("iris", "iris:1"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"image {request.image} not found")
        return ib.Image(group="team-a", name="iris", version=1, build_id=BUILD)

    async def StreamBuildLogs(self, request: Any, context: Any) -> AsyncIterator[ib.BuildLogLine]:
        self.calls.append("StreamBuildLogs+follow" if request.follow else "StreamBuildLogs")
        if request.build_id != BUILD:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"build {request.build_id} not found")
        for seq, line in enumerate(LINES, start=1):
            yield ib.BuildLogLine(seq=seq, at=AT, line=line)
            await asyncio.sleep(0)


@dataclass
class FakeLogs(lg_grpc.LogServiceServicer):
    """Holds the build's lines, or none (``has`` false: expired, or not ingested yet)."""

    has: bool = True
    requests: list[lg.TailLogsRequest] = field(default_factory=list)

    async def TailLogs(self, request: Any, context: Any) -> AsyncIterator[lg.LogBatch]:
        self.requests.append(request)
        f = request.filter
        if not self.has or f.build_id != BUILD:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"build {f.build_id} does not exist; see `shipyard image builds`",
            )
        found = [
            lg.LogLine(at=AT, offset=seq, text=text, build_id=BUILD)
            for seq, text in enumerate(LINES, start=1)
            if f.grep.casefold() in text.casefold()
        ]
        yield lg.LogBatch(lines=found[-(request.limit or 2000) :])

    async def DownloadLogs(self, request: Any, context: Any) -> AsyncIterator[lg.LogBatch]:
        yield lg.LogBatch(
            lines=[
                lg.LogLine(at=AT, offset=seq, text=text, build_id=BUILD)
                for seq, text in enumerate(LINES, start=1)
            ]
        )


@dataclass
class Fakes:
    images: FakeImageBuild
    logs: FakeLogs
    home: Path
    dead_logging: Path


@pytest.fixture
async def fakes(tmp_path: Path) -> AsyncIterator[Fakes]:
    images, logs = FakeImageBuild(), FakeLogs()
    async with (
        serving((ib_grpc.add_ImageBuildServiceServicer_to_server, images)) as ib_address,
        serving((lg_grpc.add_LogServiceServicer_to_server, logs)) as lg_address,
    ):
        home = write_config(
            tmp_path / "home", "t", {"imagebuild": ib_address, "logging": lg_address}
        )
        dead = write_config(
            tmp_path / "dead",
            "t",
            {"imagebuild": ib_address, "logging": f"127.0.0.1:{free_port()}"},
        )
        yield Fakes(images, logs, home, dead)


async def test_the_whole_log_comes_from_imagebuild(fakes: Fakes) -> None:
    result = await shipyard(fakes.home, "image", "logs", BUILD)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == LINES
    assert fakes.images.calls == ["StreamBuildLogs"] and fakes.logs.requests == []


async def test_tail_asks_the_logging_service_and_grep_alone_reads_every_line(
    fakes: Fakes,
) -> None:
    last = await shipyard(fakes.home, "image", "logs", BUILD, "--tail", "2")
    assert last.stdout.splitlines() == ["ERROR: no wheel for numpy", "failed"]
    found = await shipyard(
        fakes.home, "image", "logs", BUILD, "--grep", "error", "--tail", "5", "--json"
    )
    assert [json.loads(x) for x in found.stdout.splitlines()] == [
        {"seq": 8, "line": "ERROR: no wheel for numpy", "at": "2023-11-14T22:13:20+00:00"}
    ]
    assert [(r.filter.build_id, r.filter.grep, r.limit) for r in fakes.logs.requests] == [
        (BUILD, "", 2),
        (BUILD, "error", 5),
    ]
    assert fakes.images.calls == []
    # --grep without --tail: every matching line, from imagebuild's whole copy (the
    # logging service answers the last 2000 at most).
    every = await shipyard(fakes.home, "image", "logs", BUILD, "--grep", "step")
    assert every.stdout.splitlines() == [ln for ln in LINES if "step" in ln]
    assert fakes.images.calls == ["StreamBuildLogs"] and len(fakes.logs.requests) == 2


@pytest.mark.parametrize("why", ["not stored", "unreachable"])
async def test_without_the_logging_service_imagebuilds_copy_gives_the_same(
    fakes: Fakes, why: str
) -> None:
    home = fakes.home
    if why == "not stored":
        fakes.logs.has = False  # retention passed, or not ingested yet
    else:
        home = fakes.dead_logging
    last = await shipyard(home, "image", "logs", BUILD, "--tail", "2")
    assert last.exit_code == 0, last.output
    assert last.stdout.splitlines() == ["ERROR: no wheel for numpy", "failed"]
    found = await shipyard(home, "image", "logs", BUILD, "--grep", "STEP", "--tail", "3")
    assert found.stdout.splitlines() == ["step 5", "step 6", "step 7"]
    assert fakes.images.calls == ["StreamBuildLogs", "StreamBuildLogs"]


async def test_an_image_names_its_build(fakes: Fakes) -> None:
    result = await shipyard(fakes.home, "image", "logs", "iris:1", "--tail", "1")
    assert result.stdout.splitlines() == ["failed"]
    assert fakes.images.calls == ["GetImage"]
    assert fakes.logs.requests[0].filter.build_id == BUILD
    whole = await shipyard(fakes.home, "image", "logs", "iris")
    assert whole.stdout.splitlines() == LINES
    missing = await shipyard(fakes.home, "image", "logs", "nope:3")
    assert missing.exit_code == 1 and "image nope:3 not found" in missing.stderr


async def test_follow_with_tail_starts_at_the_last_lines(fakes: Fakes) -> None:
    result = await shipyard(fakes.home, "image", "logs", BUILD, "--follow", "--tail", "2")
    assert result.stdout.splitlines() == ["ERROR: no wheel for numpy", "failed"]
    assert fakes.images.calls == ["StreamBuildLogs", "StreamBuildLogs+follow"]


async def test_the_python_client_reads_the_same(fakes: Fakes, tmp_path: Path) -> None:
    client = Client(home=fakes.home)
    try:
        whole = await run(lambda: list(client.logs.build_log(BUILD)))
        assert [(ln.seq, ln.line) for ln in whole] == list(enumerate(LINES, start=1))
        tail = await run(client.logs.tail_build, BUILD, tail=3)
        assert [ln.seq for ln in tail] == [7, 8, 9]
        path = tmp_path / "build.log"
        assert await run(client.logs.download_build, BUILD, path) == len(LINES)
        assert path.read_text().splitlines() == LINES
        fakes.logs.has = False
        with pytest.raises(NotFound, match="does not exist"):
            await run(client.logs.tail_build, BUILD)
        fallback = await run(lambda: list(client.logs.build_log(BUILD, tail=3)))
        assert fallback == tail
    finally:
        client.close()
