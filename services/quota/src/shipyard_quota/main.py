"""Runs the quota service: ``python -m shipyard_quota``."""

from __future__ import annotations

import asyncio

from shipyard.quota.v1 import quota_pb2_grpc
from shipyard_core.auth import Authenticator
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.logs import configure_logging
from shipyard_core.service import EventSourcedService
from shipyard_core.telemetry import configure_tracing
from shipyard_quota.api import QuotaApi
from shipyard_quota.app import QuotaApp
from shipyard_quota.projections import UsageProjection
from shipyard_quota.settings import QuotaSettings


async def build(settings: QuotaSettings, authenticator: Authenticator | None = None) -> ServiceHost:
    """The service, ready to start (tests start it on port 0). Callers are
    authenticated by the identity service at ``settings.keys_addr`` by default."""
    svc = EventSourcedService(settings, "quota", [UsageProjection()])
    await svc.open()
    app = QuotaApp(svc.store, svc.pool, projection_wait=settings.projection_wait_seconds)
    host = ServiceHost(settings, authenticator=authenticator)
    host.add_servicer(quota_pb2_grpc.add_QuotaServiceServicer_to_server, QuotaApi(app))
    svc.attach(host)
    return host


async def serve() -> int:
    """Runs until SIGTERM; returns the exit code."""
    settings = QuotaSettings()
    configure_logging(settings)
    configure_tracing(settings.service_name, settings.otlp_endpoint)
    host = await build(settings)
    return await host.run()


def main() -> None:
    """Console entry point."""
    raise SystemExit(asyncio.run(serve()))
