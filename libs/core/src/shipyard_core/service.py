"""The parts every event-sourced service has, wired once.

A service's ``main`` builds its settings, opens an ``EventSourcedService`` (pool, schema,
event store, JetStream streams, outbox relay, projection runners), builds its app on
``svc.store`` and ``svc.pool``, and attaches everything to a ``ServiceHost``, which also
serves ``EventAdmin`` (list events, lag, replay) for the service."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import asyncpg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from shipyard_core import bus, db
from shipyard_core.eventstore import EventStore, Upcasters, ensure_schema, validate_identifier
from shipyard_core.grpckit.event_admin import EventAdminApi
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.outbox import OutboxRelay
from shipyard_core.projections import Projection, ProjectionRunner
from shipyard_core.settings import CommonSettings


class EventSourcedService:
    """Opens and closes a service's event-sourcing infrastructure."""

    def __init__(
        self,
        settings: CommonSettings,
        service: str,
        projections: Sequence[Projection] = (),
        *,
        upcasters: Upcasters | None = None,
        pool_size: int = 20,
    ) -> None:
        self.settings = settings
        self.service = validate_identifier(service)
        self.projections = list(projections)
        self.upcasters = upcasters or Upcasters()
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._store: EventStore | None = None
        self.relay: OutboxRelay | None = None
        self.runners: list[ProjectionRunner] = []

    @property
    def pool(self) -> asyncpg.Pool:
        """The service's connection pool (after ``open``)."""
        assert self._pool is not None, "open() first"
        return self._pool

    @property
    def store(self) -> EventStore:
        """The service's event store (after ``open``)."""
        assert self._store is not None, "open() first"
        return self._store

    @property
    def nc(self) -> NATS:
        """The NATS connection (after ``open``), for core subjects such as load reports."""
        assert self._nc is not None, "open() first"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """JetStream (after ``open``)."""
        assert self._js is not None, "open() first"
        return self._js

    async def open(self) -> None:
        """Connects, creates the schema, streams and projection tables."""
        dsn = self.settings.database_url
        self._pool = await db.create_pool(dsn, max_size=self.pool_size)
        async with self._pool.acquire() as conn:
            await ensure_schema(conn, self.service)
            for projection in self.projections:
                await projection.create_tables(conn)
        self._nc = await bus.connect(self.settings.nats_url, self.settings.service_name)
        self._js = self._nc.jetstream()
        await bus.ensure_streams(self._js)
        self._store = EventStore(self._pool, self.service, self.upcasters)
        self.relay = OutboxRelay(dsn, self._js, self.service)
        self.runners = [ProjectionRunner(p, dsn, self._js) for p in self.projections]
        for runner in self.runners:
            await runner.ensure_consumer()

    def attach(self, host: ServiceHost) -> None:
        """Runs the relay and runners under ``host``, serves EventAdmin, closes on exit."""
        assert self.relay is not None, "open() first"
        host.add_background(f"{self.service}-outbox-relay", self.relay.run)
        for runner in self.runners:
            host.add_background(f"{self.service}-projection-{runner.projection.name}", runner.run)
        from shipyard.common.v1 import events_pb2_grpc

        host.add_servicer(events_pb2_grpc.add_EventAdminServicer_to_server, EventAdminApi(self))
        host.add_close_hook(self.close)

    async def close(self) -> None:
        """Closes the broker connection and the pool."""
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        if self._pool is not None:
            await self._pool.close()
