"""Fixtures for the logging service: the service on real PostgreSQL + NATS, a publisher
of LOGS batches, and scheduler events that say who owns which deployment."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from shipyard.logging.v1 import logging_pb2 as pb
from shipyard.logging.v1 import logging_pb2_grpc
from shipyard_core import bus
from shipyard_core.auth import Principal
from shipyard_core.eventstore import StoredEvent
from shipyard_core.logbatch import Line, LogBatch
from shipyard_logging.main import LoggingService, build_service
from shipyard_logging.settings import LoggingSettings
from shipyard_testing import StaticAuthenticator, wait_for

TOKENS = {
    "admin": Principal("root", True, frozenset()),
    "ana": Principal("ana", False, frozenset({"team-a"})),
    "bob": Principal("bob", False, frozenset({"team-b"})),
}


def md(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a test user."""
    return (("authorization", f"Bearer {token}"),)


def logging_settings(database_url: str, nats_url: str, **extra: object) -> LoggingSettings:
    """Settings for a test: this test's PostgreSQL and NATS, any free port."""
    return LoggingSettings(
        database_url=database_url,
        nats_url=nats_url,
        grpc_port=0,
        log_json=False,
        shutdown_grace_seconds=2,
        follow_poll_seconds=0.05,
        ingest_ack_wait_seconds=2,
        gap_wait_seconds=3,
        **extra,  # type: ignore[arg-type]
    )


@dataclass
class Bus:
    """A NATS connection of the test's own, publishing like a shipper and a scheduler."""

    nc: NATS
    js: JetStreamContext
    versions: dict[str, int]

    async def publish(self, batch: LogBatch) -> None:
        """Publishes one LOGS batch as a shipper does."""
        await self.js.publish(
            batch.subject,
            batch.encode(),
            stream=bus.LOGS_STREAM,
            headers={"Nats-Msg-Id": batch.msg_id},
        )

    async def scheduler_event(self, deployment: str, event_type: str, **payload: object) -> None:
        """Publishes a scheduler ``deployment`` event as the scheduler's relay does."""
        stream_id = f"deployment:{deployment}"
        version = self.versions.get(stream_id, 0) + 1
        self.versions[stream_id] = version
        event = StoredEvent(
            service="scheduler",
            event_id=uuid.uuid4(),
            stream_id=stream_id,
            version=version,
            aggregate="deployment",
            event_type=event_type,
            schema_version=1,
            payload=dict(payload),
            metadata={},
            recorded_at=datetime.now(UTC),
        )
        await self.js.publish(
            event.subject,
            event.encode(),
            stream=bus.EVENTS_STREAM,
            headers={"Nats-Msg-Id": str(event.event_id)},
        )

    async def created(self, deployment: str, group: str, revision: int = 1) -> None:
        """``DeploymentCreated`` (only the fields the logging service reads)."""
        await self.scheduler_event(deployment, "DeploymentCreated", group=group, revision=revision)


@pytest.fixture
async def nats_bus(nats_url: str) -> AsyncIterator[Bus]:
    nc = await bus.connect(nats_url, "test")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    try:
        yield Bus(nc, js, {})
    finally:
        await nc.close()


@dataclass
class Server:
    """A running logging service and a stub connected to it."""

    service: LoggingService
    channel: grpc.aio.Channel
    stub: logging_pb2_grpc.LogServiceStub

    async def lines_stored(self) -> int:
        """How many lines the service has stored."""
        return int(await self.service.svc.pool.fetchval("SELECT count(*) FROM logging.lines"))

    async def owners_known(self, *names: str) -> bool:
        """Whether the deployment-lives projection has seen every one of ``names``."""
        rows = await self.service.svc.pool.fetch(
            "SELECT DISTINCT name FROM logging.deployment_lives"
        )
        return set(names) <= {r["name"] for r in rows}


async def start_server(settings: LoggingSettings) -> Server:
    """Builds and starts the service; the caller stops it."""
    service = await build_service(settings, StaticAuthenticator(TOKENS))
    await service.host.start()
    channel = grpc.aio.insecure_channel(service.host.address)
    return Server(service, channel, logging_pb2_grpc.LogServiceStub(channel))


async def stop_server(server: Server) -> None:
    """Closes the channel and stops the service."""
    await server.channel.close()
    await server.service.host.stop()


@pytest.fixture
async def server(database_url: str, nats_url: str) -> AsyncIterator[Server]:
    """The logging service as ``main.build_service`` wires it, on a free port."""
    running = await start_server(logging_settings(database_url, nats_url))
    try:
        yield running
    finally:
        await stop_server(running)


def batch(
    instance: str,
    texts: Iterable[str | bytes],
    *,
    start: int = 0,
    deployment: str = "iris",
    revision: int = 1,
    at: datetime | None = None,
) -> LogBatch:
    """A batch of whole lines of ``instance`` from byte ``start`` on, as the local
    shipper makes them (offsets are byte positions, each line plus its newline)."""
    stamp = at or datetime.now(UTC)
    lines = []
    pos = start
    for text in texts:
        raw = text if isinstance(text, bytes) else text.encode()
        lines.append(Line(pos, stamp, raw.decode("utf-8", errors="replace")))
        pos += len(raw) + 1
    return LogBatch("instance", instance, deployment, revision, "output", start, pos, lines)


async def tail(
    stub: logging_pb2_grpc.LogServiceStub,
    token: str,
    deployment: str,
    instance: str = "",
    limit: int = 0,
    **filters: object,
) -> list[pb.LogLine]:
    """Every line TailLogs streams back."""
    request = pb.TailLogsRequest(
        filter=pb.LogFilter(deployment=deployment, instance=instance, **filters),  # type: ignore[arg-type]
        limit=limit,
    )
    return [line async for b in stub.TailLogs(request, metadata=md(token)) for line in b.lines]


async def wait_stored(server: Server, count: int) -> None:
    """Waits until the service has stored ``count`` lines."""
    await wait_for(
        lambda: _equals(server.lines_stored, count),
        timeout=20,
        message=f"{count} lines were not stored",
    )


async def _equals(fn: object, expected: int) -> bool:
    return bool(await fn() == expected)  # type: ignore[operator]
