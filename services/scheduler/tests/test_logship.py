"""The local log shipper on real NATS: a real process writes its log file as the local
backend's instances do, and every line reaches LOGS once, in order, across restarts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from shipyard_core import bus
from shipyard_core.logbatch import MAX_LINE_BYTES, JetStreamLogPublisher, LogBatch
from shipyard_scheduler.adapters.logship import (
    POSITIONS_FILE,
    LocalLogShipper,
    parse_instance_id,
)
from shipyard_testing import wait_for

INSTANCE = "iris-prod-r3-x7k2p"

# Prints N numbered lines on stdout and stderr alternately, one odd-bytes line and one
# very long line, like a model server's output.
WRITER = r"""
import os, sys
n = int(sys.argv[1])
for i in range(n):
    stream = sys.stdout if i % 2 == 0 else sys.stderr
    stream.write(f"line {i}\n")
    stream.flush()
os.write(1, b"odd \xff\xfe\x00 bytes\n")
os.write(1, b"y" * 20000 + b"\n")
sys.stdout.write("last words without newline")
sys.stdout.flush()
"""


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(nats_url, "test")
    stream = nc.jetstream()
    await bus.ensure_streams(stream)
    try:
        yield stream
    finally:
        await nc.close()


def run_writer(log: Path, n: int) -> None:
    """Runs the writer with stdout and stderr appended to ``log`` (as ``_spawn`` does)."""
    with log.open("ab") as out:
        subprocess.run(
            [sys.executable, "-c", WRITER, str(n)],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=60,
        )


async def stored_batches(js: JetStreamContext) -> list[LogBatch]:
    """Every batch on LOGS, in stream order."""
    info = await js.stream_info(bus.LOGS_STREAM)
    batches = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(bus.LOGS_STREAM, seq)
        assert msg.data is not None
        batches.append(LogBatch.decode(msg.data))
    return batches


def test_instance_ids_name_deployment_and_revision() -> None:
    assert parse_instance_id(INSTANCE) == ("iris-prod", 3)
    assert parse_instance_id("a-r1-b-r2-c0ffe") == ("a-r1-b", 2)
    assert parse_instance_id("not-an-instance") is None


async def test_every_line_reaches_logs_once_in_order_across_restarts(
    tmp_path: Path, js: JetStreamContext
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / f"{INSTANCE}.log"
    run_writer(log, 500)

    shipper = LocalLogShipper(logs, JetStreamLogPublisher(js), idle_flush=0.0)
    await wait_for(shipper.ship_once, message="nothing shipped")
    assert await shipper.ship_once() == 0  # nothing new: nothing sent
    first = await stored_batches(js)
    lines = [ln for b in first for ln in b.lines]
    texts = [ln.text for ln in lines]
    assert texts[:500] == [f"line {i}" for i in range(500)]
    assert texts[500] == "odd \ufffd\ufffd\ufffd bytes"
    assert [len(t) for t in texts[501:503]] == [MAX_LINE_BYTES, 20000 - MAX_LINE_BYTES]
    assert lines[501].cut and not lines[502].cut
    assert texts[503] == "last words without newline"  # flushed: the file went idle
    assert {(b.deployment, b.revision, b.stream) for b in first} == {("iris-prod", 3, "output")}
    assert [ln.offset for ln in lines] == sorted({ln.offset for ln in lines})
    assert first[-1].end == log.stat().st_size

    # The process runs again (a restart of the instance appends to its log), and the
    # scheduler restarts too: a new shipper continues where the last one was acknowledged.
    run_writer(log, 10)
    again = LocalLogShipper(logs, JetStreamLogPublisher(js), idle_flush=0.0)
    await wait_for(again.ship_once, message="nothing shipped after the restart")
    after = await stored_batches(js)
    new_lines = [ln.text for b in after[len(first) :] for ln in b.lines]
    assert new_lines[:10] == [f"line {i}" for i in range(10)]
    assert len(new_lines) == 14

    # A scheduler killed after publishing but before saving its position re-sends the
    # same range with the same Nats-Msg-Id: JetStream stores it once.
    positions = logs / POSITIONS_FILE
    positions.write_text(f'{{"{INSTANCE}": {after[len(first)].start}}}')
    replay = LocalLogShipper(logs, JetStreamLogPublisher(js), idle_flush=0.0)
    assert await replay.ship_once() == 14
    assert len(await stored_batches(js)) == len(after)


async def test_unterminated_lines_wait_until_the_file_is_idle(
    tmp_path: Path, js: JetStreamContext
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / f"{INSTANCE}.log"
    log.write_bytes(b"whole\nhalf a li")
    shipper = LocalLogShipper(logs, JetStreamLogPublisher(js), idle_flush=3600)
    assert await shipper.ship_once() == 1
    with log.open("ab") as fh:
        fh.write(b"ne\n")
    assert await shipper.ship_once() == 1
    texts = [ln.text for b in await stored_batches(js) for ln in b.lines]
    assert texts == ["whole", "half a line"]
    (logs / "README.txt.log").write_text("not an instance\n")
    assert await shipper.ship_once() == 0
