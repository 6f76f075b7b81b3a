"""Runs the imagebuild service: ``python -m shipyard_imagebuild``."""

from __future__ import annotations

import asyncio

from shipyard.imagebuild.v1 import imagebuild_pb2_grpc
from shipyard_core.auth import Authenticator
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.logs import configure_logging
from shipyard_core.objectstore import open_store
from shipyard_core.service import EventSourcedService
from shipyard_core.telemetry import configure_tracing
from shipyard_imagebuild.adapters import envpack
from shipyard_imagebuild.api import ImageBuildApi
from shipyard_imagebuild.app import buildlogs
from shipyard_imagebuild.app.builder import Builder
from shipyard_imagebuild.app.commands import ImageCommands
from shipyard_imagebuild.app.queries import ImageQueries
from shipyard_imagebuild.projections import SCHEMA, CatalogProjection, UsageProjection
from shipyard_imagebuild.settings import ImageBuildSettings


async def build(
    settings: ImageBuildSettings,
    authenticator: Authenticator | None = None,
    *,
    ack_wait: float = 60.0,
) -> ServiceHost:
    """The service, ready to start (tests start it on port 0)."""
    svc = EventSourcedService(settings, SCHEMA, [CatalogProjection(), UsageProjection()])
    await svc.open()
    async with svc.pool.acquire() as conn:
        await buildlogs.ensure_table(conn)
    objects = open_store(settings.store_url())
    queries = ImageQueries(svc.pool)
    commands = ImageCommands(
        svc.pool,
        svc.store,
        objects,
        queries,
        projection_wait_seconds=settings.projection_wait_seconds,
    )
    builder = Builder(
        svc.pool,
        svc.store,
        svc.js,
        objects,
        work_dir=settings.builds_path(),
        uv_cache_dir=settings.uv_cache_path(),
        runtime_source=settings.runtime_source or envpack.default_runtime_source(),
        size_limit_bytes=settings.image_size_limit_bytes,
        concurrency=settings.build_concurrency,
        max_attempts=settings.max_build_attempts,
        ack_wait=ack_wait,
    )
    host = ServiceHost(settings, authenticator=authenticator)
    host.add_servicer(
        imagebuild_pb2_grpc.add_ImageBuildServiceServicer_to_server,
        ImageBuildApi(commands, queries, settings.max_upload_bytes),
    )
    if settings.build_concurrency > 0:
        host.add_background("imagebuild-builder", builder.run)
    svc.attach(host)
    return host


async def serve() -> int:
    """Runs until SIGTERM; returns the exit code."""
    settings = ImageBuildSettings()
    configure_logging(settings)
    configure_tracing(settings.service_name, settings.otlp_endpoint)
    host = await build(settings, ack_wait=settings.build_ack_wait_seconds)
    return await host.run()


def main() -> None:
    """Console entry point."""
    raise SystemExit(asyncio.run(serve()))
