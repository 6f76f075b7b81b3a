"""``GET /metrics`` (Prometheus text exposition) and the same numbers over OpenTelemetry.

The gateway counts every request already, for the ``METRICS`` stream
(:class:`~shipyard_gateway.metrics.MetricsRecorder`: cumulative integer counters per
deployment). This module only READS those counters: text is rendered when Prometheus
scrapes, OpenTelemetry observations are made when its reader collects, so neither adds
work to a request. (The one exception is the OpenTelemetry latency histogram, which the
OpenTelemetry API offers only in a synchronous form: when OTLP export is on, each request
records its latency into it; see :func:`export_to_opentelemetry`.)

Exposition: text format 0.0.4 (``# HELP``, ``# TYPE``, label values escaped), content
type :data:`CONTENT_TYPE`. Labels are the deployment's name, the status class and the
failure kind, never anything a caller chooses (request ids, keys, unknown names: requests
naming a deployment the gateway does not know are one unlabelled counter).

================================================  =========  ==============================
metric                                            type       labels
================================================  =========  ==============================
``shipyard_gateway_requests_total``               counter    deployment, status_class
``shipyard_gateway_request_duration_seconds``     histogram  deployment (``le``: 5 ms … 10 s)
``shipyard_gateway_requests_in_flight``           gauge      deployment
``shipyard_gateway_upstream_errors_total``        counter    deployment, kind
``shipyard_gateway_unrouted_requests_total``      counter    —
``shipyard_gateway_info``                         gauge      version, gateway
``process_cpu_seconds_total`` and friends         (as every Prometheus client exposes them)
================================================  =========  ==============================

``status_class`` is ``2xx`` (any status below 400), ``4xx`` or ``5xx``; ``kind`` is one of
:data:`~shipyard_gateway.metrics.UPSTREAM_ERROR_KINDS`. Every deployment in the routing
table has every series (zeros included), so rates start at once and a dashboard shows 0
rather than "no data".

Who may scrape (``settings.metrics_endpoint``; docs/decisions/0030): the REST port is
the public data plane, and deployment names (of private deployments too) are their
owners' business, so by default (``auth``) ``/metrics`` wants ``Authorization: Bearer``
with the scrape token (``settings.metrics_token``: every deployment), an admin's token
(every deployment) or a member's user token (the deployments of the member's groups
only). ``open`` serves everything to anyone (a gateway port only Prometheus can reach);
``off`` leaves the route out.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import psutil  # type: ignore[import-untyped]  # no types-psutil in the dev group yet
from aiohttp import web

from shipyard_core.auth import Authenticator
from shipyard_core.errors import Unauthenticated
from shipyard_gateway.access import credentials_from_headers
from shipyard_gateway.load import LoadTracker
from shipyard_gateway.metrics import (
    LATENCY_BOUNDS_MS,
    UPSTREAM_ERROR_KINDS,
    DeploymentCounts,
    MetricsRecorder,
)
from shipyard_gateway.routing import RoutingTable

__all__ = [
    "CONTENT_TYPE",
    "DURATION",
    "FAMILIES",
    "INFO",
    "IN_FLIGHT",
    "LABEL_NAMES",
    "METRICS_PATH",
    "OTEL_DURATION",
    "OTEL_IN_FLIGHT",
    "OTEL_REQUESTS",
    "OTEL_UNROUTED",
    "OTEL_UPSTREAM_ERRORS",
    "REQUESTS",
    "SAMPLE_NAMES",
    "STATUS_CLASSES",
    "UNROUTED",
    "UPSTREAM_ERRORS",
    "GatewayMetrics",
    "escape_label_value",
    "export_to_opentelemetry",
    "mount_metrics_endpoint",
    "otlp_meter_provider",
    "shutdown_meter_provider",
]

METRICS_PATH = "/metrics"

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What Prometheus expects of the text format."""

REQUESTS = "shipyard_gateway_requests_total"
DURATION = "shipyard_gateway_request_duration_seconds"
IN_FLIGHT = "shipyard_gateway_requests_in_flight"
UPSTREAM_ERRORS = "shipyard_gateway_upstream_errors_total"
UNROUTED = "shipyard_gateway_unrouted_requests_total"
INFO = "shipyard_gateway_info"
PROCESS_CPU = "process_cpu_seconds_total"
PROCESS_RSS = "process_resident_memory_bytes"
PROCESS_START = "process_start_time_seconds"
PROCESS_FDS = "process_open_fds"

STATUS_CLASSES = ("2xx", "4xx", "5xx")
"""Values of the ``status_class`` label."""


def by_status_class(counts: DeploymentCounts | None) -> list[tuple[str, int]]:
    """A deployment's requests per status class, in :data:`STATUS_CLASSES` order (zeros
    when it has none): the same series for ``/metrics`` and for OpenTelemetry."""
    values = (counts.ok, counts.client_errors, counts.server_errors) if counts else (0, 0, 0)
    return list(zip(STATUS_CLASSES, values, strict=True))


LABEL_NAMES = frozenset({"deployment", "status_class", "kind", "le", "version", "gateway"})
"""Every label name that can appear (a dashboard's queries may group by these only)."""

FAMILIES: dict[str, tuple[str, str]] = {
    REQUESTS: (
        "counter",
        "Requests to a deployment (every route naming it: predictions, metadata, readiness) "
        "by the class of the status answered; 2xx counts every status below 400.",
    ),
    DURATION: (
        "histogram",
        "Time from the request read to the answer ready, model server included, in seconds.",
    ),
    IN_FLIGHT: (
        "gauge",
        "Requests to a deployment in progress at this gateway (past routing and the access "
        "check; waiting for a scaled-to-zero deployment included).",
    ),
    UPSTREAM_ERRORS: (
        "counter",
        "Failed calls to model servers: connect (no connection; another instance was tried), "
        "timeout (504), broken (502).",
    ),
    UNROUTED: ("counter", "Requests naming a deployment this gateway does not know (404)."),
    INFO: ("gauge", "This gateway process: its version and id; always 1."),
    PROCESS_CPU: ("counter", "User and system CPU time spent, in seconds."),
    PROCESS_RSS: ("gauge", "Resident memory size, in bytes."),
    PROCESS_START: ("gauge", "Start time of the process since the Unix epoch, in seconds."),
    PROCESS_FDS: ("gauge", "Open file descriptors."),
}
"""Every metric family exposed: name → (type, help)."""

SAMPLE_NAMES: frozenset[str] = frozenset(
    name
    for family, (kind, _) in FAMILIES.items()
    for name in (
        (f"{family}_bucket", f"{family}_sum", f"{family}_count")
        if kind == "histogram"
        else (family,)
    )
)
"""Every sample name that can appear in the exposition (a histogram's ``_bucket``,
``_sum`` and ``_count``): what PromQL may reference (the Grafana dashboard's test)."""

_LE = (*(f"{bound / 1000:g}" for bound in LATENCY_BOUNDS_MS), "+Inf")


def escape_label_value(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and line feed
    escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


Visible = Callable[[str], bool]
"""Which deployments a caller may see (None: all)."""


class GatewayMetrics:
    """The gateway's numbers, read on demand: the recorder's counters, the in-flight load,
    the routing table (which deployments exist), and the process."""

    def __init__(
        self,
        recorder: MetricsRecorder,
        table: RoutingTable,
        load: LoadTracker,
        *,
        version: str,
        gateway_id: str,
    ) -> None:
        self.recorder = recorder
        self.table = table
        self.load = load
        self.version = version
        self.gateway_id = gateway_id
        self._process = psutil.Process(os.getpid())
        self._started = self._process.create_time()

    def deployments(self, visible: Visible | None = None) -> list[str]:
        """Every deployment with series: those in the routing table and those counted
        (sorted; only the ``visible`` ones)."""
        names = set(self.table.routes())
        names.update(name for name, _ in self.recorder.totals())
        if visible is not None:
            names = {name for name in names if visible(name)}
        return sorted(names)

    def render(self, visible: Visible | None = None) -> bytes:
        """The exposition, with the deployments ``visible`` says (None: all)."""
        names = self.deployments(visible)
        totals = dict(self.recorder.totals())
        labels = {name: f'deployment="{escape_label_value(name)}"' for name in names}
        out: list[str] = []

        def family(name: str) -> None:
            kind, text = FAMILIES[name]
            out.append(f"# HELP {name} {_escape_help(text)}\n# TYPE {name} {kind}\n")

        family(REQUESTS)
        for name in names:
            for status_class, value in by_status_class(totals.get(name)):
                out.append(f'{REQUESTS}{{{labels[name]},status_class="{status_class}"}} {value}\n')

        family(DURATION)
        for name in names:
            counts = totals.get(name)
            cumulative = 0
            for le, count in zip(_LE, counts.buckets if counts else [0] * len(_LE), strict=True):
                cumulative += count
                out.append(f'{DURATION}_bucket{{{labels[name]},le="{le}"}} {cumulative}\n')
            seconds = counts.latency_sum / 1000.0 if counts else 0.0
            out.append(f"{DURATION}_sum{{{labels[name]}}} {_number(seconds)}\n")
            out.append(f"{DURATION}_count{{{labels[name]}}} {cumulative}\n")

        family(IN_FLIGHT)
        for name in names:
            out.append(f"{IN_FLIGHT}{{{labels[name]}}} {self.load.inflight(name)}\n")

        family(UPSTREAM_ERRORS)
        errors = dict(self.recorder.upstream_errors)
        for name in names:
            for kind in UPSTREAM_ERROR_KINDS:
                value = errors.get((name, kind), 0)
                out.append(f'{UPSTREAM_ERRORS}{{{labels[name]},kind="{kind}"}} {value}\n')

        family(UNROUTED)
        out.append(f"{UNROUTED} {self.recorder.unrouted_total}\n")

        family(INFO)
        out.append(
            f'{INFO}{{version="{escape_label_value(self.version)}",'
            f'gateway="{escape_label_value(self.gateway_id)}"}} 1\n'
        )
        self._render_process(out, family)
        return "".join(out).encode()

    def _render_process(self, out: list[str], family: Callable[[str], None]) -> None:
        times = os.times()
        family(PROCESS_CPU)
        out.append(f"{PROCESS_CPU} {_number(times.user + times.system)}\n")
        family(PROCESS_START)
        out.append(f"{PROCESS_START} {_number(self._started)}\n")
        try:
            rss = int(self._process.memory_info().rss)
        except psutil.Error:  # pragma: no cover - the process is this one
            rss = None
        if rss is not None:
            family(PROCESS_RSS)
            out.append(f"{PROCESS_RSS} {rss}\n")
        try:
            fds: int | None = int(self._process.num_fds())
        except (AttributeError, psutil.Error):  # not on Windows
            fds = None
        if fds is not None:
            family(PROCESS_FDS)
            out.append(f"{PROCESS_FDS} {fds}\n")


# --- the HTTP endpoint ----------------------------------------------------------------------

_HOW = (
    "GET /metrics wants `Authorization: Bearer <token>`: the gateway's scrape token "
    "(SHIPYARD_METRICS_TOKEN), an admin's token (every deployment) or a member's user "
    "token (the deployments of the member's groups)"
)


def mount_metrics_endpoint(
    app: web.Application,
    metrics: GatewayMetrics,
    *,
    mode: str,
    token: str,
    authenticator: Authenticator,
) -> None:
    """Adds ``GET /metrics`` to ``app`` as ``mode`` says: ``auth`` (a token; see the
    module docstring), ``open`` (no check) or ``off`` (no route)."""
    if mode == "off":
        return
    if mode not in ("auth", "open"):
        raise ValueError(f"metrics_endpoint must be auth, open or off, not {mode!r}")
    scrape_digest = _digest(token) if token else b""

    async def visible_to(request: web.Request) -> Visible | None:
        credentials = credentials_from_headers(request.headers)
        if credentials is None:
            raise Unauthenticated(_HOW)
        if scrape_digest and hmac.compare_digest(_digest(credentials.secret), scrape_digest):
            return None
        if credentials.is_client_key:
            raise Unauthenticated(f"a client key opens one deployment's predictions; {_HOW}")
        try:
            principal = await authenticator.authenticate(credentials.secret)
        except Unauthenticated as exc:
            raise Unauthenticated(f"{exc.message}; {_HOW}") from None
        if principal.admin or principal.internal:
            return None

        def visible(name: str) -> bool:
            route = metrics.table.get(name)
            return route is not None and principal.can_see(route.group)

        return visible

    async def scrape(request: web.Request) -> web.Response:
        visible = None if mode == "open" else await visible_to(request)
        return web.Response(body=metrics.render(visible), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get(METRICS_PATH, scrape)


def _digest(secret: str) -> bytes:
    # Compared as digests: equal length, so compare_digest leaks nothing about the length.
    return hmac.digest(b"shipyard-metrics", secret.encode(), "sha256")


# --- OpenTelemetry ----------------------------------------------------------------------------

OTEL_REQUESTS = "shipyard.gateway.requests"
OTEL_DURATION = "shipyard.gateway.request.duration"
OTEL_IN_FLIGHT = "shipyard.gateway.requests.in_flight"
OTEL_UPSTREAM_ERRORS = "shipyard.gateway.upstream.errors"
OTEL_UNROUTED = "shipyard.gateway.unrouted_requests"


def export_to_opentelemetry(metrics: GatewayMetrics, provider: Any) -> None:
    """Registers the gateway's numbers with an OpenTelemetry ``MeterProvider``: counters
    and the in-flight count as asynchronous instruments read from the same counters as
    ``/metrics`` when the provider's readers collect; the latency as a histogram (same
    bounds) that every request records into from now on.

    Names follow OpenTelemetry's conventions and translate to the Prometheus names above
    (``shipyard.gateway.requests`` with unit ``{request}`` → ``shipyard_gateway_requests_total``,
    ``shipyard.gateway.request.duration`` in ``s`` →
    ``shipyard_gateway_request_duration_seconds``, ...), with the same attributes, so the
    dashboard serves both. Callbacks run in the reader's thread: they only read.
    """
    from opentelemetry.metrics import CallbackOptions, Observation

    meter = provider.get_meter("shipyard_gateway", metrics.version)
    recorder = metrics.recorder

    def requests(options: CallbackOptions) -> Iterable[Observation]:
        totals = dict(recorder.totals())
        for name in metrics.deployments():
            for status_class, value in by_status_class(totals.get(name)):
                yield Observation(value, {"deployment": name, "status_class": status_class})

    def in_flight(options: CallbackOptions) -> Iterable[Observation]:
        for name in metrics.deployments():
            yield Observation(metrics.load.inflight(name), {"deployment": name})

    def upstream_errors(options: CallbackOptions) -> Iterable[Observation]:
        errors = dict(recorder.upstream_errors)
        for name in metrics.deployments():
            for kind in UPSTREAM_ERROR_KINDS:
                yield Observation(errors.get((name, kind), 0), {"deployment": name, "kind": kind})

    def unrouted(options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(recorder.unrouted_total)

    meter.create_observable_counter(
        OTEL_REQUESTS, [requests], unit="{request}", description=FAMILIES[REQUESTS][1]
    )
    meter.create_observable_up_down_counter(
        OTEL_IN_FLIGHT, [in_flight], unit="{request}", description=FAMILIES[IN_FLIGHT][1]
    )
    meter.create_observable_counter(
        OTEL_UPSTREAM_ERRORS,
        [upstream_errors],
        unit="{error}",
        description=FAMILIES[UPSTREAM_ERRORS][1],
    )
    meter.create_observable_counter(
        OTEL_UNROUTED, [unrouted], unit="{request}", description=FAMILIES[UNROUTED][1]
    )
    histogram = meter.create_histogram(
        OTEL_DURATION,
        unit="s",
        description=FAMILIES[DURATION][1],
        explicit_bucket_boundaries_advisory=[bound / 1000 for bound in LATENCY_BOUNDS_MS],
    )
    record = histogram.record

    def observe(deployment: str, seconds: float) -> None:
        record(seconds, {"deployment": deployment})

    recorder.latency_observer = observe


def otlp_meter_provider(service_name: str, endpoint: str, interval_seconds: float) -> Any:
    """A ``MeterProvider`` exporting over OTLP/gRPC to ``endpoint`` every
    ``interval_seconds`` (cumulative temporality, as Prometheus wants). Shut it down with
    :func:`shutdown_meter_provider`."""
    # Imported here: a gateway without a collector never loads the exporter.
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=endpoint, timeout=5),
        export_interval_millis=interval_seconds * 1000,
    )
    return MeterProvider(
        metric_readers=[reader], resource=Resource.create({SERVICE_NAME: service_name})
    )


async def shutdown_meter_provider(provider: Any, timeout_seconds: float = 5.0) -> None:
    """Exports the last numbers and stops the provider's reader thread, off the event
    loop (the export is a blocking gRPC call)."""
    await asyncio.to_thread(provider.shutdown, timeout_millis=int(timeout_seconds * 1000))
