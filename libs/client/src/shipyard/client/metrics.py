"""Request metrics of deployments (the logging service keeps them 3 days, per minute).

>>> m = client.metrics.get("iris-prod", since=timedelta(hours=1))
>>> m.total.qps, m.total.success_rate, m.total.latency_p95_ms
>>> [p.requests for p in m.series]                    # one point per step, oldest first

The same call is ``client.deployments.metrics(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shipyard.client._channel import Transport
from shipyard.client._convert import PlainData, to_datetime
from shipyard.client.logs import When, timestamp
from shipyard.logging.v1 import metrics_pb2 as pb
from shipyard.logging.v1 import metrics_pb2_grpc as pb_grpc

SERVICE = "logging"


@dataclass(frozen=True)
class MetricsSummary(PlainData):
    """Requests over a time range. Rates are fractions (0..1); latencies milliseconds,
    estimated from a histogram; ``latency_above_range``: a percentile is above 10 s (the
    value shown is then 10 s, a lower bound)."""

    start: datetime | None
    end: datetime | None
    requests: int
    status_2xx: int
    status_4xx: int
    status_5xx: int
    qps: float
    success_rate: float
    rate_4xx: float
    rate_5xx: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    async_requests: int
    latency_above_range: bool

    @classmethod
    def from_proto(cls, msg: pb.MetricsSummary) -> MetricsSummary:
        """Builds it from the protobuf message."""
        return cls(
            start=to_datetime(msg.start),
            end=to_datetime(msg.end),
            requests=msg.requests,
            status_2xx=msg.status_2xx,
            status_4xx=msg.status_4xx,
            status_5xx=msg.status_5xx,
            qps=msg.qps,
            success_rate=msg.success_rate,
            rate_4xx=msg.rate_4xx,
            rate_5xx=msg.rate_5xx,
            latency_p50_ms=msg.latency_p50_ms,
            latency_p95_ms=msg.latency_p95_ms,
            latency_p99_ms=msg.latency_p99_ms,
            latency_mean_ms=msg.latency_mean_ms,
            async_requests=msg.async_requests,
            latency_above_range=msg.latency_above_range,
        )


@dataclass(frozen=True)
class DeploymentMetrics(PlainData):
    """A deployment's metrics over a range: in total and one point per ``step_minutes``."""

    deployment: str
    total: MetricsSummary
    series: list[MetricsSummary]
    step_minutes: int

    @classmethod
    def from_proto(cls, msg: pb.DeploymentMetrics) -> DeploymentMetrics:
        """Builds it from the protobuf message."""
        return cls(
            deployment=msg.deployment,
            total=MetricsSummary.from_proto(msg.total),
            series=[MetricsSummary.from_proto(s) for s in msg.series],
            step_minutes=msg.step_minutes,
        )


class MetricsClient:
    """Typed calls to the logging service's metrics. Obtain it as ``Client().metrics``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _stub(self) -> pb_grpc.MetricsServiceStub:
        return self._transport.stub(SERVICE, pb_grpc.MetricsServiceStub)

    def get(
        self,
        deployment: str,
        *,
        since: When = None,
        until: When = None,
        step_minutes: int = 0,
    ) -> DeploymentMetrics:
        """QPS, success rate, 4xx and 5xx rates and latency percentiles of a deployment
        over ``[since, until)`` (default: the last hour), in total and per step (default:
        at most 60 points). ``since``/``until`` take a datetime or a timedelta before now."""
        reply: pb.DeploymentMetrics = self._transport.call(
            SERVICE,
            "GetMetrics",
            self._stub().GetMetrics,
            pb.GetMetricsRequest(
                deployment=deployment,
                since=timestamp(since),
                until=timestamp(until),
                step_minutes=step_minutes,
            ),
        )
        return DeploymentMetrics.from_proto(reply)
