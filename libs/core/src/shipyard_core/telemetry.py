"""Tracing: one TracerProvider per process, W3C trace context across process boundaries.

The gRPC kit carries the context in call metadata and the event bus in NATS headers, both
through :func:`inject_headers` / :func:`extract_context`, so one trace follows a command
from the CLI through the service, its events and every projection or policy they reach.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "configure_tracing",
    "current_trace_ids",
    "extract_context",
    "flush_tracing",
    "inject_headers",
    "tracer",
]

log = logging.getLogger(__name__)

# W3C trace context (`traceparent`, `tracestate`) plus W3C baggage. Fixed rather than the
# global propagator so that what travels in NATS headers does not depend on whatever an
# imported library or OTEL_PROPAGATORS configured.
_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])

_lock = threading.Lock()
_provider: TracerProvider | None = None
_otlp_endpoints: set[str] = set()


def configure_tracing(service_name: str, otlp_endpoint: str | None = None) -> TracerProvider:
    """Installs the process-wide SDK TracerProvider and returns it.

    Spans are always recorded (so trace ids reach the logs and are propagated); they are
    exported over OTLP/gRPC only when ``otlp_endpoint`` is given. Safe to call more than
    once: later calls reuse the installed provider (OpenTelemetry allows only one per
    process) and only attach an OTLP exporter for an endpoint not attached yet. If some
    other code installed an SDK provider first, that one is reused.
    """
    global _provider
    with _lock:
        if _provider is None:
            installed = trace.get_tracer_provider()
            if isinstance(installed, TracerProvider):
                _provider = installed
            else:
                _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
                trace.set_tracer_provider(_provider)
        if otlp_endpoint and otlp_endpoint not in _otlp_endpoints:
            # Imported here: the exporter pulls in grpc and protobuf modules that a process
            # without a collector never needs.
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            _provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint))
            )
            _otlp_endpoints.add(otlp_endpoint)
            log.info("exporting traces to %s", otlp_endpoint)
        return _provider


def flush_tracing(timeout_seconds: float = 5.0) -> None:
    """Exports the spans still buffered (call it on shutdown). No-op without a provider."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_millis=int(timeout_seconds * 1000))


def tracer(name: str) -> trace.Tracer:
    """The tracer for instrumentation scope ``name`` (usually the module's ``__name__``)."""
    return trace.get_tracer(name)


def inject_headers(
    headers: dict[str, str] | None = None, context: Context | None = None
) -> dict[str, str]:
    """Writes the trace context (``traceparent``, and ``tracestate``/``baggage`` when set)
    of ``context`` (default: the current one) into ``headers`` and returns them.

    A new dict is made when ``headers`` is None. Nothing is written when there is no
    valid span, so an untraced message carries no bogus ``traceparent``.
    """
    carrier: dict[str, str] = {} if headers is None else headers
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The context carried by ``headers`` (NATS headers, gRPC metadata as a dict).

    Starts from an empty context, never the current one, so a span started with it is a
    child of the remote caller or a new root, never of whatever the consumer was doing.
    """
    if not headers:
        return Context()
    # W3C header names are lower case; gRPC metadata keys are too, NATS headers may not be.
    carrier = {key.lower(): value for key, value in headers.items() if isinstance(value, str)}
    return _PROPAGATOR.extract(carrier, context=Context())


def current_trace_ids() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` of the current span as lower-case hex, or None without one."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return trace.format_trace_id(span_context.trace_id), trace.format_span_id(span_context.span_id)
