"""The gateway's settings (env prefix ``SHIPYARD_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shipyard_core.settings import CommonSettings


class GatewaySettings(CommonSettings):
    """Settings of the gateway: the prediction data plane."""

    service_name: str = "gateway"
    """The name in logs, traces and the NATS connection."""

    grpc_port: int = 8081
    """Port of the gateway's gRPC server: the Open Inference Protocol
    (``inference.GRPCInferenceService``), health checking and reflection."""

    http_host: str = "127.0.0.1"
    """Interface the REST data plane binds to. Use ``0.0.0.0`` (or ``::``) in a container."""

    http_port: int = Field(default=8080, ge=0, le=65535)
    """Port of the REST data plane (Open Inference Protocol v2, KServe v1, Seldon, raw
    JSON; health); 0 lets the OS choose (the host reports the bound port as
    ``http_port``)."""

    quota_addr: str = "127.0.0.1:50052"
    """``host:port`` of the quota service (for the REST facade, ``/api/v1``)."""

    imagebuild_addr: str = "127.0.0.1:50053"
    """``host:port`` of the imagebuild service (for the REST facade, ``/api/v1``)."""

    scheduler_addr: str = "127.0.0.1:50054"
    """``host:port`` of the scheduler, whose ``WatchRoutes`` stream keeps the routing table
    current and whose ``Activate`` wakes deployments scaled to zero."""

    activation_timeout_seconds: float = Field(default=120.0, gt=0)
    """How long a request waits for a deployment without a ready instance (scaled to zero,
    or starting) to get one before it is answered 503."""

    upstream_timeout_seconds: float = Field(default=60.0, gt=0)
    """How long a model server gets to answer one request (connecting included) before
    the caller gets 504."""

    connect_timeout_seconds: float = Field(default=2.0, gt=0)
    """How long connecting to a model server may take; an instance that does not accept
    the connection in time is skipped and the request goes to another one."""

    unreachable_seconds: float = Field(default=5.0, ge=0)
    """How long an instance that refused a connection is passed over (unless no other
    one is left), until the scheduler's health checks take it out of the routes."""

    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    """Largest request body accepted (default 32 MiB, the model server's own limit);
    larger ones get 413 (REST; gRPC: RESOURCE_EXHAUSTED for a larger message)."""

    check_body_max_bytes: int = Field(default=64 * 1024, ge=0)
    """Bodies up to this size are checked by the gateway (valid JSON, the protocol's
    envelope, tensor shapes against their data) so malformed ones get 400 without a trip to
    a model server; larger ones go to the model server unparsed (it checks the same), so
    the gateway never spends long on one body. Raw JSON is never parsed. 0: no checks."""

    max_inflight_per_deployment: int = Field(default=256, ge=0)
    """Concurrency limit of a deployment at this gateway process when its route sets none
    (``RouteUpdate.max_inflight``): requests beyond it get 429 with ``Retry-After`` (gRPC:
    RESOURCE_EXHAUSTED). Requests waiting for a scaled-to-zero deployment count. 0: no
    limit."""

    client_key_cache_seconds: float = Field(default=1.0, ge=0, le=1.0)
    """How long the keys service's acceptance of a client key is reused (at most 1 s, so a
    revoked key is refused within a second). Refusals are never cached. 0: ask every time."""

    metrics_interval_seconds: float = Field(default=10.0, gt=0)
    """How often the request metrics are published to the ``METRICS`` stream (one message
    per gateway process per interval, on ``metrics.gateway.<gateway_id>``)."""

    metrics_max_pending: int = Field(default=60, ge=1)
    """How many intervals of metrics are kept while they cannot be published (NATS down);
    beyond that the oldest are dropped with a warning."""

    upstream_connections_per_host: int = Field(default=512, ge=1)
    """At most this many connections to one model server instance (kept alive and
    reused); further requests wait for a free one."""

    load_report_interval_seconds: float = Field(default=1.0, gt=0)
    """How often the in-flight load per deployment is published on NATS
    (``shipyard.load.gateway``) for the scheduler's autoscaler."""

    logging_addr: str = "127.0.0.1:50056"
    """``host:port`` of the logging service, for the REST facade's logs and metrics
    routes (empty: those routes are left out)."""

    asyncinference_addr: str = "127.0.0.1:50055"
    """``host:port`` of the async inference service: requests with
    ``X-Async-Request: true`` go to it; the ``/async`` and ``/batch`` routes ask it."""

    trace_all_requests: bool = False
    """Record a span for every prediction. Off by default, when no trace exporter is
    configured: a span per request costs ~100 µs of CPU (~40% of the gateway's own
    work per request) and nobody would see it. Spans are recorded anyway when
    ``otlp_endpoint`` is set, and for any request that arrives with a ``traceparent``
    (the caller traces: its trace goes on through here)."""

    metrics_endpoint: Literal["auth", "open", "off"] = "auth"
    """``GET /metrics`` (Prometheus text format) on the REST port: ``auth`` wants
    ``Authorization: Bearer`` with ``metrics_token`` or an admin's token (every deployment)
    or a member's user token (the deployments of the member's groups only); ``open``
    serves every deployment to anyone (only where nobody but Prometheus reaches the port);
    ``off``: no such route. See docs/decisions/0030."""

    metrics_token: str = ""
    """The scrape token: ``Authorization: Bearer <it>`` on ``GET /metrics`` sees every
    deployment, and nothing else (give it to Prometheus, not the internal token). Empty:
    only user tokens are accepted."""

    otlp_metrics_interval_seconds: float = Field(default=15.0, gt=0)
    """How often the request metrics are exported over OTLP when ``otlp_endpoint`` is set
    (the same counters as ``/metrics``, cumulative)."""

    gateway_id: str = ""
    """The id of this gateway process in load reports and metrics. Empty:
    ``<hostname>-<pid>-<random>`` (unique per process, which is what the autoscaler needs
    to sum over gateways, and what makes metrics message ids unique)."""
