"""Runs the scheduler service: ``python -m shipyard_scheduler``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from shipyard.scheduler.v1 import scheduler_pb2_grpc
from shipyard_core.auth import Authenticator
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.logs import configure_logging
from shipyard_core.objectstore import ObjectStore, open_store, s3_endpoint_from_env
from shipyard_core.service import EventSourcedService
from shipyard_core.telemetry import configure_tracing
from shipyard_scheduler.adapters.backend import RuntimeBackend
from shipyard_scheduler.adapters.peers import Peers
from shipyard_scheduler.api import SchedulerApi
from shipyard_scheduler.app.autoscaler import LOAD_SUBJECT, Autoscaler
from shipyard_scheduler.app.commands import DeploymentCommands
from shipyard_scheduler.app.queries import DeploymentQueries
from shipyard_scheduler.app.reconciler import Reconciler
from shipyard_scheduler.app.routes import RouteHub
from shipyard_scheduler.domain import SCHEDULER_UPCASTERS
from shipyard_scheduler.projections import SCHEMA, DeploymentsProjection
from shipyard_scheduler.settings import SchedulerSettings


def make_backend(settings: SchedulerSettings, objects: ObjectStore) -> RuntimeBackend:
    """The runtime backend the settings name."""
    if settings.runtime_backend == "kubernetes":
        from shipyard_scheduler.adapters.kubernetes import KubernetesBackend

        return KubernetesBackend(
            namespace=settings.k8s_namespace,
            service_image=settings.k8s_service_image,
            runtime_image=settings.k8s_runtime_image,
            pull_secret=settings.k8s_image_pull_secret or None,
            store_secret=settings.k8s_store_secret or None,
            object_store=settings.store_url(),
            s3_endpoint=s3_endpoint_from_env(),
            grace_seconds=round(settings.grace_seconds),
            drain_seconds=round(settings.drain_seconds),
        )
    from shipyard_scheduler.adapters.local import LocalBackend

    return LocalBackend(
        objects,
        settings.runtime_path(),
        host=settings.instance_host,
        grace_seconds=settings.grace_seconds,
        initial_backoff=settings.restart_backoff_seconds,
    )


@dataclass
class Scheduler:
    """The parts tests reach into."""

    host: ServiceHost
    commands: DeploymentCommands
    queries: DeploymentQueries
    reconciler: Reconciler
    autoscaler: Autoscaler
    backend: RuntimeBackend


async def build_scheduler(
    settings: SchedulerSettings,
    authenticator: Authenticator | None = None,
    backend: RuntimeBackend | None = None,
) -> Scheduler:
    """The service, ready to start (tests start it on port 0)."""
    svc = EventSourcedService(
        settings, SCHEMA, [DeploymentsProjection()], upcasters=SCHEDULER_UPCASTERS
    )
    await svc.open()
    backend = backend or make_backend(settings, open_store(settings.store_url()))
    peers = Peers(settings.quota_addr, settings.imagebuild_addr)
    queries = DeploymentQueries(svc.pool, settings.gateway_url)
    commands = DeploymentCommands(
        svc.pool,
        svc.store,
        peers,
        queries,
        default_target_inflight=settings.default_target_inflight,
        projection_wait_seconds=settings.projection_wait_seconds,
        runtime_backend=backend.name,
    )
    autoscaler = Autoscaler(
        scale_down_delay=settings.scale_down_delay_seconds,
        scale_to_zero_after=settings.scale_to_zero_after_seconds,
        max_age=settings.load_report_max_age_seconds,
    )
    reconciler = Reconciler(
        settings.database_url,
        svc.pool,
        svc.store,
        backend,
        autoscaler,
        interval=settings.reconcile_interval_seconds,
        max_restarts=settings.max_restarts,
        drain_seconds=settings.drain_seconds,
    )
    hub = RouteHub(settings.database_url, queries)
    host = ServiceHost(settings, authenticator=authenticator)
    host.add_servicer(
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
        SchedulerApi(commands, queries, hub),
    )

    async def load_reports(stop: asyncio.Event) -> None:
        sub = await svc.nc.subscribe(LOAD_SUBJECT, cb=_observe(autoscaler))
        try:
            await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    host.add_background("scheduler-reconciler", reconciler.run)
    host.add_background("scheduler-routes", hub.run)
    host.add_background("scheduler-load-reports", load_reports)
    if settings.ship_logs:
        _ship_logs(host, backend, svc)
    if settings.prefetch_images:
        _prefetch_images(host, backend, svc, queries, settings.image_cache_keep)
    host.add_close_hook(peers.close)
    svc.attach(host)
    return Scheduler(host, commands, queries, reconciler, autoscaler, backend)


def _ship_logs(host: ServiceHost, backend: RuntimeBackend, svc: EventSourcedService) -> None:
    """Ships the local backend's instance logs to LOGS (docs/decisions/0024-logs.md)."""
    from shipyard_core.logbatch import JetStreamLogPublisher
    from shipyard_scheduler.adapters.local import LocalBackend
    from shipyard_scheduler.adapters.logship import LocalLogShipper

    if isinstance(backend, LocalBackend):
        shipper = LocalLogShipper(backend.root / "logs", JetStreamLogPublisher(svc.js))
        host.add_background("scheduler-log-shipper", shipper.run)


def _prefetch_images(
    host: ServiceHost,
    backend: RuntimeBackend,
    svc: EventSourcedService,
    queries: DeploymentQueries,
    keep: int,
) -> None:
    """Unpacks new images before their first deployment (local backend only)."""
    from shipyard_scheduler.adapters.local import LocalBackend
    from shipyard_scheduler.adapters.prefetch import ImagePrefetcher

    if isinstance(backend, LocalBackend):
        prefetcher = ImagePrefetcher(svc.nc, backend, keep, queries.image_digests_in_use)
        host.add_background("scheduler-prefetch", prefetcher.run)


def _observe(autoscaler: Autoscaler) -> Callable[[Msg], Awaitable[None]]:
    async def on_message(msg: Msg) -> None:
        autoscaler.observe(msg.data)

    return on_message


async def build(
    settings: SchedulerSettings, authenticator: Authenticator | None = None
) -> ServiceHost:
    """The service host, ready to start."""
    return (await build_scheduler(settings, authenticator)).host


async def serve() -> int:
    """Runs until SIGTERM; returns the exit code."""
    settings = SchedulerSettings()
    configure_logging(settings)
    configure_tracing(settings.service_name, settings.otlp_endpoint)
    host = await build(settings)
    return await host.run()


def stop_local_instances() -> None:
    """Stops every model server of the local backend (without a running scheduler)."""
    from shipyard_scheduler.adapters.local import LocalBackend

    settings = SchedulerSettings()
    backend = LocalBackend(open_store(settings.store_url()), settings.runtime_path())
    asyncio.run(backend.shutdown_all())


def main() -> None:
    """Console entry point."""
    raise SystemExit(asyncio.run(serve()))
