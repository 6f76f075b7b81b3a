"""Runs the imagebuild service: ``python -m shipyard_imagebuild``."""

from __future__ import annotations

import asyncio
from typing import Any

from shipyard.imagebuild.v1 import imagebuild_pb2_grpc
from shipyard_core import kube
from shipyard_core.aggregate import Repository
from shipyard_core.auth import Authenticator
from shipyard_core.errors import ShipyardError
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.logs import configure_logging
from shipyard_core.objectstore import open_store
from shipyard_core.service import EventSourcedService
from shipyard_core.telemetry import configure_tracing
from shipyard_imagebuild.adapters import envpack
from shipyard_imagebuild.api import ImageBuildApi
from shipyard_imagebuild.app import buildlogs
from shipyard_imagebuild.app.backends import make_backend
from shipyard_imagebuild.app.builder import Builder
from shipyard_imagebuild.app.commands import ImageCommands
from shipyard_imagebuild.app.queries import ImageQueries
from shipyard_imagebuild.domain import IMAGEBUILD_EVENTS, IMAGEBUILD_UPCASTERS, ImageRepo
from shipyard_imagebuild.projections import SCHEMA, CatalogProjection, UsageProjection
from shipyard_imagebuild.settings import ImageBuildSettings, load_settings


async def build(
    settings: ImageBuildSettings,
    authenticator: Authenticator | None = None,
    *,
    ack_wait: float = 60.0,
    kube_client: Any = None,
) -> ServiceHost:
    """The service, ready to start (tests start it on port 0). With the kubernetes build
    backend, ``kube_client`` is the Kubernetes ``ApiClient`` to use (left open); without
    one it is made from the environment as the scheduler's kubernetes backend makes its
    own (:func:`shipyard_core.kube.load_api_client`: the pod's service account in a
    cluster, else the kubeconfig) and closed at exit."""
    owned_client = None
    if settings.build_backend == "kubernetes" and kube_client is None:
        # Before anything is opened: a missing cluster configuration fails the start.
        kube_client = owned_client = kube.load_api_client()
    svc = EventSourcedService(
        settings,
        SCHEMA,
        [CatalogProjection(), UsageProjection()],
        upcasters=IMAGEBUILD_UPCASTERS,
    )
    await svc.open()
    async with svc.pool.acquire() as conn:
        await buildlogs.ensure_table(conn)
    objects = open_store(settings.store_url())
    backend = make_backend(
        settings,
        objects,
        Repository(svc.store, ImageRepo, IMAGEBUILD_EVENTS),
        runtime_source=settings.runtime_source or envpack.default_runtime_source(),
        api_client=kube_client,
    )
    queries = ImageQueries(svc.pool)
    commands = ImageCommands(
        svc.pool,
        svc.store,
        objects,
        queries,
        projection_wait_seconds=settings.projection_wait_seconds,
        cache_key=backend.cache_key,
    )
    builder = Builder(
        svc.pool,
        svc.store,
        svc.js,
        backend,
        work_dir=settings.builds_path(),
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
    if owned_client is not None:
        host.add_close_hook(owned_client.close)
    return host


async def serve(settings: ImageBuildSettings | None = None) -> int:
    """Runs until SIGTERM; returns the exit code. A configuration that cannot work (no
    cluster for the kubernetes backend, say) ends the process with one line saying why."""
    settings = settings or load_settings()
    configure_logging(settings)
    configure_tracing(settings.service_name, settings.otlp_endpoint)
    try:
        host = await build(settings, ack_wait=settings.build_ack_wait_seconds)
    except ShipyardError as exc:
        raise SystemExit(f"imagebuild: cannot start: {' '.join(exc.message.split())}") from None
    return await host.run()


def main() -> None:
    """Console entry point."""
    settings = load_settings()
    raise SystemExit(asyncio.run(serve(settings)))
