"""Instance output to `shipyard deploy logs`, across services: a real process writes its
log as the local backend's instances do, the scheduler's shipper sends it to LOGS, the
logging service stores it, and the Python client reads it back (tail, follow, download),
for its owner only."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from nats.js import JetStreamContext

from shipyard.cli.main import cli
from shipyard.client import Client, NotFound
from shipyard.client.config import ClientConfig
from shipyard_core import bus
from shipyard_core.auth import Principal
from shipyard_core.eventstore import StoredEvent
from shipyard_core.logbatch import JetStreamLogPublisher, LogBatch, split_lines
from shipyard_logging.main import LoggingService, build_service
from shipyard_logging.settings import LoggingSettings
from shipyard_scheduler.adapters.logship import LocalLogShipper
from shipyard_testing import StaticAuthenticator, wait_for

INSTANCE = "echo-r1-q9w8e"
PROGRAM = r"""
import sys
for i in range(3000):
    print(f"request {i} ok", flush=False)
print("warming up", file=sys.stderr, flush=True)
sys.stdout.flush()
"""


async def scheduler_created(js: JetStreamContext, deployment: str, group: str) -> None:
    """The scheduler's ``DeploymentCreated``: tells the logging service who owns it."""
    created = StoredEvent(
        service="scheduler",
        event_id=uuid.uuid4(),
        stream_id=f"deployment:{deployment}",
        version=1,
        aggregate="deployment",
        event_type="DeploymentCreated",
        schema_version=1,
        payload={"group": group, "revision": 1},
        metadata={},
        recorded_at=datetime.now(UTC),
    )
    await js.publish(created.subject, created.encode(), stream=bus.EVENTS_STREAM)


@pytest.fixture
async def logging_service(database_url: str, nats_url: str) -> AsyncIterator[LoggingService]:
    settings = LoggingSettings(
        database_url=database_url,
        nats_url=nats_url,
        grpc_port=0,
        log_json=False,
        shutdown_grace_seconds=1,
        follow_poll_seconds=0.05,
    )
    tokens = {
        "ana": Principal("ana", False, frozenset({"team-a"})),
        "bob": Principal("bob", False, frozenset({"team-b"})),
    }
    service = await build_service(settings, StaticAuthenticator(tokens))
    async with service.host:
        yield service


async def test_a_processs_output_reaches_the_client(
    tmp_path: Path, nats_url: str, logging_service: LoggingService
) -> None:
    nc = await bus.connect(nats_url, "scheduler-under-test")
    js = nc.jetstream()
    await scheduler_created(js, "echo", "team-a")

    logs = tmp_path / "logs"
    logs.mkdir()
    with (logs / f"{INSTANCE}.log").open("ab") as out:
        # Output to a file, stdout and stderr merged, as the local backend starts instances.
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PROGRAM, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
        assert await asyncio.wait_for(process.wait(), 60) == 0
    shipper = LocalLogShipper(logs, JetStreamLogPublisher(js), interval=0.05)
    stop = asyncio.Event()
    shipping = asyncio.create_task(shipper.run(stop))
    config = ClientConfig(endpoints={"logging": logging_service.host.address})
    ana = Client(token="ana", config=config)
    bob = Client(token="bob", config=config)
    try:

        def stored() -> bool:
            try:
                return len(ana.deployments.logs("echo", tail=5000)) == 3001
            except NotFound:  # the owner is not projected yet
                return False

        await wait_for(lambda: asyncio.to_thread(stored), timeout=30, message="lines missing")
        lines = await asyncio.to_thread(ana.deployments.logs, "echo")
        assert len(lines) == 2000
        assert lines[-2].text == "request 2999 ok" and lines[-1].text == "warming up"
        assert {(ln.instance, ln.revision, ln.stream) for ln in lines} == {(INSTANCE, 1, "output")}
        target = tmp_path / "echo.log"
        written = await asyncio.to_thread(ana.deployments.download_logs, "echo", INSTANCE, target)
        assert written == 3001
        assert target.read_text().splitlines()[:2] == ["request 0 ok", "request 1 ok"]
        with pytest.raises(NotFound):
            await asyncio.to_thread(bob.deployments.logs, "echo")

        # Follow: lines written after the follow began arrive too.
        got: list[str] = []
        done = threading.Event()

        def follow() -> None:
            for line in ana.deployments.follow_logs("echo", tail=1):
                got.append(line.text)
                if line.text == "late line":
                    done.set()
                    return

        follower = asyncio.create_task(asyncio.to_thread(follow))
        await wait_for(lambda: got == ["warming up"], message="follow backlog missing")
        with (logs / f"{INSTANCE}.log").open("ab") as out:
            out.write(b"late line\n")
        await asyncio.wait_for(follower, 30)
        assert got == ["warming up", "late line"]
    finally:
        stop.set()
        await shipping
        ana.close()
        bob.close()
        await nc.close()


async def sy(address: str, home: Path, token: str, *args: str) -> Result:
    """The CLI as a person types it (in a thread: the service runs on this loop)."""

    def invoke() -> Result:
        return CliRunner().invoke(
            cli,
            ["--home", str(home), "--token", token, *args],
            prog_name="shipyard",
            env={"SHIPYARD_LOGGING_ADDR": address},
            catch_exceptions=False,
        )

    return await asyncio.to_thread(invoke)


async def test_the_cli_shows_logs_and_metrics(
    tmp_path: Path, nats_url: str, logging_service: LoggingService
) -> None:
    nc = await bus.connect(nats_url, "cli-test")
    js = nc.jetstream()
    try:
        await scheduler_created(js, "echo", "team-a")
        raw = b"starting\nrequest 1 failed: boom\nrequest 2 ok\n"
        lines, end = split_lines(raw, 0, datetime.now(UTC))
        batch = LogBatch("instance", INSTANCE, "echo", 1, "output", 0, end, lines)
        await js.publish(batch.subject, batch.encode(), stream=bus.LOGS_STREAM)
        start = datetime.now(UTC) - timedelta(minutes=3)
        buckets: dict[str, Any] = {"5": 8, "10": 1, "+Inf": 0}
        report = {
            "gateway": "gw-1",
            "seq": 1,
            "start": start.isoformat(),
            "end": (start + timedelta(seconds=10)).isoformat(),
            "unrouted": 0,
            "deployments": {
                "echo": {
                    "requests": 10,
                    "2xx": 8,
                    "4xx": 1,
                    "5xx": 1,
                    "latency_ms_buckets": {**buckets, "25": 1},
                    "latency_ms_sum": 42.0,
                    "protocols": {"raw": 10},
                }
            },
        }
        await js.publish("metrics.gateway.gw-1", json.dumps(report).encode(), stream="METRICS")
        address = logging_service.host.address

        async def ready() -> bool:
            result = await sy(address, tmp_path, "ana", "deploy", "logs", "echo")
            return result.exit_code == 0 and "request 2 ok" in result.stdout

        await wait_for(ready, timeout=20, message="logs never readable through the CLI")
        text = (await sy(address, tmp_path, "ana", "deploy", "logs", "echo", "-n", "2")).stdout
        assert [line.split(" ", 2)[1:] for line in text.splitlines()] == [
            [INSTANCE, "request 1 failed: boom"],
            [INSTANCE, "request 2 ok"],
        ]
        found = await sy(
            address, tmp_path, "ana", "deploy", "logs", "echo", "--grep", "FAILED", "--json"
        )
        assert [json.loads(x)["text"] for x in found.stdout.splitlines()] == [
            "request 1 failed: boom"
        ]
        nothing = await sy(address, tmp_path, "ana", "deploy", "logs", "echo", "--grep", "zebra")
        assert nothing.exit_code == 0 and nothing.stdout == ""
        assert "no log line of echo in this range contains 'zebra'" in nothing.stderr
        target = tmp_path / "replica.log"
        saved = await sy(
            address, tmp_path, "ana", "deploy", "logs", "echo", "--download", str(target)
        )
        assert saved.exit_code == 0, saved.output
        assert target.read_bytes() == raw
        refused = await sy(address, tmp_path, "bob", "deploy", "logs", "echo")
        assert refused.exit_code == 1
        assert refused.stderr.startswith("error: ") and "does not exist" in refused.stderr
        bad = await sy(address, tmp_path, "ana", "deploy", "logs", "echo", "--since", "soon")
        assert bad.exit_code == 2 and "neither a duration" in bad.stderr

        async def counted() -> dict[str, Any] | None:
            result = await sy(address, tmp_path, "ana", "deploy", "metrics", "echo", "--json")
            data: dict[str, Any] = json.loads(result.stdout)
            return data if data["total"]["requests"] == 10 else None

        data = await wait_for(counted, timeout=20, message="metrics never counted")
        assert data["total"]["status_5xx"] == 1 and data["total"]["success_rate"] == 0.8
        shown = await sy(address, tmp_path, "ana", "deploy", "metrics", "echo", "--since", "10m")
        assert shown.exit_code == 0, shown.output
        assert "80.0%" in shown.stdout and "qps" in shown.stdout
        # 10 requests over 10 to 11 minutes (the start is floored to its minute): the rate
        # shows its digits (0.015 to 0.017), not "0.00".
        assert re.search(r"\b0\.01[5-7]\b", shown.stdout), shown.stdout
        assert any(ch in shown.stdout for ch in "▁▂▃▄▅▆▇█")
    finally:
        await nc.close()
