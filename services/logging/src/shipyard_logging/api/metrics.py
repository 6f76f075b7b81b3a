"""MetricsService over gRPC: protobuf ↔ the app layer. No logic here."""

from __future__ import annotations

from typing import Any

from shipyard.logging.v1 import metrics_pb2 as pb
from shipyard.logging.v1 import metrics_pb2_grpc
from shipyard_core.auth import current_principal
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_logging.api.servicer import request_time
from shipyard_logging.app.metrics import MetricsQueries
from shipyard_logging.domain import log_query
from shipyard_logging.domain.metrics import Summary


def _summary(s: Summary) -> pb.MetricsSummary:
    c = s.counts
    p50, above50 = s.percentile(0.50)
    p95, above95 = s.percentile(0.95)
    p99, above99 = s.percentile(0.99)
    return pb.MetricsSummary(
        start=to_timestamp(s.start),
        end=to_timestamp(s.end),
        requests=c.requests,
        status_2xx=c.ok,
        status_4xx=c.client_errors,
        status_5xx=c.server_errors,
        qps=s.qps,
        success_rate=s.rate(c.ok),
        rate_4xx=s.rate(c.client_errors),
        rate_5xx=s.rate(c.server_errors),
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        latency_mean_ms=s.mean_ms,
        async_requests=c.async_requests,
        latency_above_range=above50 or above95 or above99,
    )


class MetricsApi(metrics_pb2_grpc.MetricsServiceServicer):
    """The gRPC face of the metric queries."""

    def __init__(self, queries: MetricsQueries) -> None:
        self.queries = queries

    async def GetMetrics(self, request: pb.GetMetricsRequest, context: Any) -> pb.DeploymentMetrics:
        log_query(request.deployment)  # checks the name
        view = await self.queries.metrics(
            current_principal(),
            request.deployment,
            request_time(request, "since"),
            request_time(request, "until"),
            request.step_minutes,
        )
        return pb.DeploymentMetrics(
            deployment=view.deployment,
            total=_summary(view.total),
            series=[_summary(s) for s in view.series],
            step_minutes=int(view.step.total_seconds() // 60),
        )
