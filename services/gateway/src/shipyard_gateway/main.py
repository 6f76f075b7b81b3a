"""Runs the gateway: ``python -m shipyard_gateway``.

One process serves:

- the REST data plane (aiohttp, ``settings.http_host:http_port``), run as a background
  task of the host and stopped gracefully (requests in progress get the grace period);
- a gRPC server (``settings.grpc_port``): the Open Inference Protocol
  (``inference.GRPCInferenceService``, :mod:`shipyard_gateway.oip_grpc`), health checking
  and reflection (what the platform supervisor probes);
- the route watcher (scheduler ``WatchRoutes``), the load reporter (NATS) and the metrics
  publisher (JetStream ``METRICS``), as background tasks;
- ``GET /metrics`` (Prometheus) on the REST port, and the same numbers over OTLP when
  ``otlp_endpoint`` is set (:mod:`shipyard_gateway.prometheus`).

Tests and embedders::

    host = await build(GatewaySettings(grpc_port=0, http_port=0, ...), authenticator)
    async with host:
        url = host.http_url                  # e.g. http://127.0.0.1:41234
        port = host.http_port                # the bound port (also when 0 was asked)
        await host.routes.wait_synced()      # the routing table is loaded
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import secrets
import socket
from typing import Any

from aiohttp import web

from shipyard.inference.v2 import oip_pb2_grpc
from shipyard_core.auth import Authenticator, authenticator_from_settings
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.logs import configure_logging
from shipyard_core.telemetry import configure_tracing
from shipyard_gateway.access import AccessControl
from shipyard_gateway.async_api import AsyncApi, mount_async_api
from shipyard_gateway.console import mount_console
from shipyard_gateway.facade import mount_facade
from shipyard_gateway.handler import PredictHandler
from shipyard_gateway.http import create_app
from shipyard_gateway.keys import ClientKeyVerifier
from shipyard_gateway.load import LoadReporter, LoadTracker
from shipyard_gateway.metrics import MetricsPublisher, MetricsRecorder
from shipyard_gateway.nats_link import NatsLink
from shipyard_gateway.oip_grpc import SERVICE_PREFIX, InferenceServicer
from shipyard_gateway.prometheus import (
    GatewayMetrics,
    export_to_opentelemetry,
    mount_metrics_endpoint,
    otlp_meter_provider,
    shutdown_meter_provider,
)
from shipyard_gateway.routing import RouteWatcher, RoutingTable
from shipyard_gateway.scheduler import SchedulerClient
from shipyard_gateway.settings import GatewaySettings
from shipyard_gateway.upstream import UpstreamClient

__all__ = ["GatewayHost", "build", "main", "serve"]

log = logging.getLogger(__name__)

_HTTP_BACKLOG = 2048  # bursts of new connections queue rather than being refused


def _version() -> str:
    try:
        return importlib.metadata.version("shipyard-gateway")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "0.0.0"


def _bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (port 0: any free one)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted gateway bind while old connections sit in TIME_WAIT; on Linux
        # it does not let two live listeners share the port (SO_REUSEPORT would).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_HTTP_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot bind the gateway's HTTP server to {host}:{port} ({exc.strerror}); "
            "set SHIPYARD_HTTP_PORT, or 0 for any free port"
        ) from exc
    return sock


class GatewayHost(ServiceHost):
    """A :class:`ServiceHost` that also serves the gateway's HTTP application.

    The HTTP socket is bound in :meth:`start`, before the gRPC server, so
    :attr:`http_port` is known as soon as ``start`` returns (or the ``async with`` block
    begins); the application is served by the ``http`` background task.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        app: web.Application,
        routes: RoutingTable,
        handler: PredictHandler,
        *,
        gateway_id: str,
        authenticator: Authenticator | None = None,
        metrics: MetricsPublisher | None = None,
        keys: ClientKeyVerifier | None = None,
        async_api: AsyncApi | None = None,
    ) -> None:
        options: list[tuple[str, Any]] = [
            # The same body limit as REST (gRPC's default is 4 MiB).
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", settings.max_body_bytes),
        ]
        super().__init__(
            settings,
            authenticator=authenticator,
            # The data plane checks its callers itself (client keys or user tokens, only
            # for private deployments): the interceptor must not demand a user token.
            public_methods=[SERVICE_PREFIX],
            options=options,
        )
        self.gateway_settings = settings
        self.app = app
        self.routes = routes
        """The routing table (``await host.routes.wait_synced()``)."""
        self.handler = handler
        """The transport-neutral prediction handler."""
        self.gateway_id = gateway_id
        """This process's id in load reports and metrics."""
        self.metrics = metrics
        """The metrics publisher (``host.metrics.recorder`` aggregates the interval)."""
        self.keys = keys
        """The client key verifier (its cache and call count)."""
        self.async_api = async_api
        """The async prediction routes (``X-Async-Request``, ``/async``, ``/batch``)."""
        self.exposition: GatewayMetrics | None = None
        """What ``GET /metrics`` and the OpenTelemetry export read."""
        self.meter_provider: Any = None
        """The OpenTelemetry MeterProvider exporting over OTLP (None without an endpoint)."""
        self._http_socket: socket.socket | None = None
        self._http_port: int | None = None
        self.add_background("http", self._serve_http)

    @property
    def http_port(self) -> int:
        """The port the HTTP server is bound to (the real one when ``http_port`` is 0)."""
        if self._http_port is None:
            raise RuntimeError("the gateway is not started; await host.start() first")
        return self._http_port

    @property
    def http_url(self) -> str:
        """``http://host:port`` clients reach the REST data plane at."""
        host = self.gateway_settings.http_host
        if host in ("0.0.0.0", "", "::", "[::]"):  # noqa: S104 - bind-any, not a bind
            host = "127.0.0.1"
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}"

    async def start(self) -> int:
        """Binds the HTTP socket, then starts the gRPC server and the background tasks
        (the HTTP server among them); returns the gRPC port."""
        sock = _bind(self.gateway_settings.http_host, self.gateway_settings.http_port)
        self._http_socket = sock
        self._http_port = int(sock.getsockname()[1])
        try:
            port = await super().start()
        except BaseException:
            self._close_http_socket()
            raise
        log.info("gateway REST on %s", self.http_url, extra={"http_port": self._http_port})
        return port

    def _close_http_socket(self) -> None:
        sock, self._http_socket = self._http_socket, None
        if sock is not None:
            sock.close()

    async def _serve_http(self, stop: asyncio.Event) -> None:
        sock = self._http_socket
        if sock is None:
            raise RuntimeError("the HTTP socket is not bound")
        runner = web.AppRunner(
            self.app,
            handle_signals=False,  # the host owns SIGTERM/SIGINT
            access_log=None,  # per-request records are the metrics' job, not the log's
            shutdown_timeout=self.settings.shutdown_grace_seconds,
        )
        await runner.setup()
        try:
            site = web.SockSite(runner, sock, backlog=_HTTP_BACKLOG)
            await site.start()
            await stop.wait()
        finally:
            # Stops accepting, closes idle keep-alive connections, lets requests in
            # progress finish within the grace period, then cancels the rest.
            await runner.cleanup()
            self._close_http_socket()


async def build(
    settings: GatewaySettings, authenticator: Authenticator | None = None
) -> GatewayHost:
    """The gateway, ready to start (tests pass ports 0 and a StaticAuthenticator).

    ``authenticator`` resolves user tokens for private deployments; by default the
    identity service at ``settings.keys_addr`` (cached), closed with the host. Client keys
    are verified by the keys service at ``settings.keys_addr`` with the internal token.
    """
    owns_authenticator = authenticator is None
    auth = authenticator if authenticator is not None else authenticator_from_settings(settings)
    gateway_id = settings.gateway_id or (
        f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    )
    version = _version()
    table = RoutingTable()
    scheduler = SchedulerClient(settings.scheduler_addr, settings.internal_token)
    watcher = RouteWatcher(table, scheduler)
    recorder = MetricsRecorder(known=table.__contains__)
    load = LoadTracker()
    exposition = GatewayMetrics(recorder, table, load, version=version, gateway_id=gateway_id)
    upstream = UpstreamClient(
        timeout_seconds=settings.upstream_timeout_seconds,
        connect_timeout_seconds=settings.connect_timeout_seconds,
        connections_per_host=settings.upstream_connections_per_host,
    )
    keys = ClientKeyVerifier(
        settings.keys_addr,
        settings.internal_token,
        ttl_seconds=settings.client_key_cache_seconds,
    )
    link = NatsLink(settings.nats_url, f"{settings.service_name}-{gateway_id}")
    reporter = LoadReporter(
        load, link, gateway_id=gateway_id, interval=settings.load_report_interval_seconds
    )
    publisher = MetricsPublisher(
        recorder,
        link,
        gateway_id=gateway_id,
        interval=settings.metrics_interval_seconds,
        max_pending=settings.metrics_max_pending,
    )
    handler = PredictHandler(
        table,
        AccessControl(auth, keys),
        scheduler,
        upstream,
        load,
        activation_timeout=settings.activation_timeout_seconds,
        unreachable_seconds=settings.unreachable_seconds,
        max_inflight=settings.max_inflight_per_deployment,
        trace_all=settings.trace_all_requests or bool(settings.otlp_endpoint),
        on_upstream_error=recorder.record_upstream_error,
    )
    app = create_app(
        handler,
        table,
        recorder,
        max_body_bytes=settings.max_body_bytes,
        check_body_max_bytes=settings.check_body_max_bytes,
        version=version,
    )
    mount_metrics_endpoint(
        app,
        exposition,
        mode=settings.metrics_endpoint,
        token=settings.metrics_token,
        authenticator=auth,
    )
    # The control-plane REST facade (/api/v1, with its OpenAPI document) on the same port.
    mount_facade(app, settings)
    # The web console (static files that call the facade and the data plane) at /console/.
    mount_console(app)
    async_api = mount_async_api(
        app,
        handler,
        recorder,
        asyncinference_addr=settings.asyncinference_addr,
        internal_token=settings.internal_token,
        max_body_bytes=settings.max_body_bytes,
        check_body_max_bytes=settings.check_body_max_bytes,
    )
    # The host gets the authenticator explicitly (so the handler and the gRPC interceptor
    # share one cache); closing it is then ours to do.
    host = GatewayHost(
        settings,
        app,
        table,
        handler,
        gateway_id=gateway_id,
        authenticator=auth,
        metrics=publisher,
        keys=keys,
        async_api=async_api,
    )
    host.exposition = exposition
    if settings.otlp_endpoint:
        host.meter_provider = otlp_meter_provider(
            settings.service_name, settings.otlp_endpoint, settings.otlp_metrics_interval_seconds
        )
        export_to_opentelemetry(exposition, host.meter_provider)
        provider = host.meter_provider
        host.add_close_hook(lambda: shutdown_meter_provider(provider))
    host.add_servicer(
        oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
        InferenceServicer(handler, table, recorder, version=version),
    )
    host.add_background("route-watcher", watcher.run)
    host.add_background("load-reporter", reporter.run)
    host.add_background("metrics-publisher", publisher.run)
    # Close hooks run last-added first, after the HTTP server and the tasks stopped.
    if owns_authenticator:
        close = getattr(auth, "close", None)
        if close is not None:
            host.add_close_hook(close)
    host.add_close_hook(scheduler.close)
    host.add_close_hook(keys.close)
    host.add_close_hook(upstream.close)
    host.add_close_hook(link.close)
    return host


async def serve() -> int:
    """Runs until SIGTERM; returns the exit code."""
    settings = GatewaySettings()
    configure_logging(settings)
    configure_tracing(settings.service_name, settings.otlp_endpoint)
    host = await build(settings)
    return await host.run()


def main() -> None:
    """Console entry point. (uvloop was measured here: ~3% less gateway CPU per request,
    within the noise, so not worth a dependency; see docs/decisions/0026.)"""
    raise SystemExit(asyncio.run(serve()))
