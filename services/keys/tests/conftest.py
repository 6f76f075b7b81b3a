"""Fixtures for the keys service: its app on real PostgreSQL + NATS, and its gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest

from shipyard.keys.v1 import identity_pb2_grpc
from shipyard_core.auth import Principal
from shipyard_core.eventstore import EventStore
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.projections import ProjectionRunner
from shipyard_core.service import EventSourcedService
from shipyard_keys.app import IdentityCommands, IdentityQueries
from shipyard_keys.main import build
from shipyard_keys.projections import SCHEMA, IdentityProjection
from shipyard_keys.settings import KeysSettings
from shipyard_testing import wait_for

ROOT = Principal(user="root", admin=True)
"""An admin caller for app-layer tests (the app trusts the Principal it is given)."""


@dataclass
class Identity:
    """The identity app with its relay and projection runner running."""

    settings: KeysSettings
    svc: EventSourcedService
    commands: IdentityCommands
    queries: IdentityQueries

    @property
    def pool(self) -> asyncpg.Pool:
        return self.svc.pool

    @property
    def store(self) -> EventStore:
        return self.svc.store

    @property
    def runner(self) -> ProjectionRunner:
        return self.svc.runners[0]


def keys_settings(database_url: str, nats_url: str) -> KeysSettings:
    """Settings for a test: this test's PostgreSQL and NATS, any free port."""
    return KeysSettings(
        database_url=database_url,
        nats_url=nats_url,
        grpc_port=0,
        log_json=False,
        shutdown_grace_seconds=2,
    )


@pytest.fixture
async def identity(database_url: str, nats_url: str) -> AsyncIterator[Identity]:
    """The app layer over real infrastructure, without the gRPC server."""
    settings = keys_settings(database_url, nats_url)
    svc = EventSourcedService(settings, SCHEMA, [IdentityProjection()])
    await svc.open()
    assert svc.relay is not None
    stop = asyncio.Event()
    tasks = [asyncio.create_task(svc.relay.run(stop))]
    tasks += [asyncio.create_task(runner.run(stop)) for runner in svc.runners]
    queries = IdentityQueries(svc.pool)
    commands = IdentityCommands(svc.pool, svc.store, queries, projection_wait_seconds=10)
    # Commands only wait for a projection that some runner applies; be sure it does.
    await wait_for(lambda: all(r.leader for r in svc.runners), message="runner never led")
    try:
        yield Identity(settings, svc, commands, queries)
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        await svc.close()


@dataclass
class Server:
    """A running keys service and a stub connected to it."""

    settings: KeysSettings
    host: ServiceHost
    channel: grpc.aio.Channel
    stub: identity_pb2_grpc.IdentityServiceStub


@pytest.fixture
async def server(database_url: str, nats_url: str) -> AsyncIterator[Server]:
    """The keys service as ``main.build`` wires it, on a free port."""
    settings = keys_settings(database_url, nats_url)
    host = await build(settings)
    await host.start()
    channel = grpc.aio.insecure_channel(host.address)
    try:
        yield Server(settings, host, channel, identity_pb2_grpc.IdentityServiceStub(channel))
    finally:
        await channel.close()
        await host.stop()
