"""Runs the logging service: ``python -m shipyard_logging`` serves gRPC until SIGTERM."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from shipyard.logging.v1 import logging_pb2_grpc, metrics_pb2_grpc
from shipyard_core import bus
from shipyard_core.auth import Authenticator
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.logs import configure_logging
from shipyard_core.service import EventSourcedService
from shipyard_core.telemetry import configure_tracing
from shipyard_logging.adapters import metrics_store
from shipyard_logging.adapters.store import ensure_tables
from shipyard_logging.api import LogApi, MetricsApi
from shipyard_logging.app import Ingester, LogQueries
from shipyard_logging.app.metrics import MetricsIngester, MetricsQueries
from shipyard_logging.projections import SCHEMA, DeploymentLivesProjection
from shipyard_logging.settings import LoggingSettings


@dataclass
class LoggingService:
    """The parts tests reach into."""

    host: ServiceHost
    svc: EventSourcedService
    ingester: Ingester
    queries: LogQueries
    metrics_ingester: MetricsIngester
    metrics: MetricsQueries


async def build_service(
    settings: LoggingSettings, authenticator: Authenticator | None = None
) -> LoggingService:
    """The service, ready to start (tests start it on port 0 with a fixed token table).

    It is event-sourced only for its read model of deployment owners (which follows the
    scheduler's events, with replay and lag through EventAdmin); its own event store
    stays empty. Log lines and request metrics are telemetry: they come from the
    ``LOGS`` and ``METRICS`` streams."""
    svc = EventSourcedService(
        settings, SCHEMA, [DeploymentLivesProjection()], pool_size=settings.database_pool_size
    )
    await svc.open()
    # LOGS's MaxAge is this service's retention (the others keep whatever it is).
    await bus.ensure_streams(svc.js, logs_max_age_seconds=settings.logs_retention_seconds)
    async with svc.pool.acquire() as conn:
        await ensure_tables(conn)
        await metrics_store.ensure_tables(conn)
    ingester = Ingester(
        settings.database_url,
        svc.js,
        retention=timedelta(seconds=settings.logs_retention_seconds),
        retention_interval=settings.retention_interval_seconds,
        batch_size=settings.ingest_batch_size,
        ack_wait=settings.ingest_ack_wait_seconds,
        gap_wait_seconds=settings.gap_wait_seconds,
    )
    await ingester.ensure_consumer()
    metrics_ingester = MetricsIngester(
        settings.database_url,
        svc.js,
        retention=timedelta(seconds=settings.metrics_retention_seconds),
        retention_interval=settings.retention_interval_seconds,
    )
    await metrics_ingester.ensure_consumer()
    queries = LogQueries(svc.pool, poll_seconds=settings.follow_poll_seconds)
    metrics = MetricsQueries(svc.pool)
    host = ServiceHost(settings, authenticator=authenticator)
    host.add_servicer(
        logging_pb2_grpc.add_LogServiceServicer_to_server, LogApi(queries, host.stopping)
    )
    host.add_servicer(metrics_pb2_grpc.add_MetricsServiceServicer_to_server, MetricsApi(metrics))
    host.add_background("logging-ingest", ingester.run)
    host.add_background("logging-metrics", metrics_ingester.run)
    svc.attach(host)
    return LoggingService(host, svc, ingester, queries, metrics_ingester, metrics)


async def build(
    settings: LoggingSettings, authenticator: Authenticator | None = None
) -> ServiceHost:
    """The service host, ready to start."""
    return (await build_service(settings, authenticator)).host


async def serve() -> int:
    """Runs until SIGTERM; returns the exit code."""
    settings = LoggingSettings()
    configure_logging(settings)
    configure_tracing(settings.service_name, settings.otlp_endpoint)
    host = await build(settings)
    return await host.run()


def main() -> None:
    """Console entry point."""
    raise SystemExit(asyncio.run(serve()))
