"""Request metrics: the gateways' reports, per-minute counts, and what a range adds up to.

A gateway report (the body of a ``METRICS`` message, documented in
``shipyard_gateway/metrics.py``) counts one interval (10 s by default) of one gateway
process per deployment: requests by status class, a latency histogram (not cumulative,
bounds below), the latency sum, requests per protocol. The logging service adds each
report to the minute holding the middle of its interval.

Percentiles come from the merged histogram, interpolated linearly inside the bucket the
rank falls in (as Prometheus' ``histogram_quantile``); a rank in the open-ended bucket
(above 10 s) is reported as 10 s and flagged ``latency_above_range``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

LATENCY_BOUNDS_MS: tuple[float, ...] = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
"""Upper bounds of the gateway's latency buckets in milliseconds (then ``+Inf``)."""
BUCKET_KEYS: tuple[str, ...] = (*(f"{b:g}" for b in LATENCY_BOUNDS_MS), "+Inf")


@dataclass
class Counts:
    """Requests of one deployment over some time."""

    requests: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0
    latency_sum_ms: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKET_KEYS))
    async_requests: int = 0

    def add(self, other: Counts) -> None:
        """Adds ``other`` into this."""
        self.requests += other.requests
        self.ok += other.ok
        self.client_errors += other.client_errors
        self.server_errors += other.server_errors
        self.latency_sum_ms += other.latency_sum_ms
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.async_requests += other.async_requests


@dataclass(frozen=True)
class GatewayReport:
    """One METRICS message."""

    gateway: str
    seq: int
    start: datetime
    end: datetime
    deployments: dict[str, Counts]

    @property
    def minute(self) -> datetime:
        """The minute (UTC) the report counts in: the one holding its interval's middle."""
        middle = self.start + (self.end - self.start) / 2
        return middle.replace(second=0, microsecond=0)


def _count(value: Any, name: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{name} is negative")
    return number


def _time(text: Any) -> datetime:
    moment = datetime.fromisoformat(str(text))
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_report(data: bytes) -> GatewayReport:
    """A gateway's METRICS message body; ValueError when it is not one."""
    try:
        body: Any = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError("the body is not a JSON object")
        deployments: dict[str, Counts] = {}
        for name, doc in dict(body["deployments"]).items():
            buckets_doc = dict(doc.get("latency_ms_buckets") or {})
            counts = Counts(
                requests=_count(doc["requests"], "requests"),
                ok=_count(doc.get("2xx", 0), "2xx"),
                client_errors=_count(doc.get("4xx", 0), "4xx"),
                server_errors=_count(doc.get("5xx", 0), "5xx"),
                latency_sum_ms=float(doc.get("latency_ms_sum", 0.0)),
                buckets=[_count(buckets_doc.get(k, 0), k) for k in BUCKET_KEYS],
                async_requests=_count(dict(doc.get("protocols") or {}).get("async", 0), "async"),
            )
            if not math.isfinite(counts.latency_sum_ms):
                raise ValueError("latency_ms_sum is not a number")
            deployments[str(name)] = counts
        report = GatewayReport(
            gateway=str(body["gateway"]),
            seq=int(body["seq"]),
            start=_time(body["start"]),
            end=_time(body["end"]),
            deployments=deployments,
        )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ValueError(f"not a gateway metrics report: {exc}") from None
    if not report.gateway or report.end < report.start:
        raise ValueError("not a gateway metrics report: no gateway, or end before start")
    return report


def quantile(buckets: list[int], q: float) -> tuple[float, bool]:
    """The ``q`` quantile (0..1) in milliseconds of a latency histogram, and whether it
    lies above the highest bound (then the value is that bound, a lower limit)."""
    total = sum(buckets)
    if total == 0:
        return 0.0, False
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(LATENCY_BOUNDS_MS):
                return LATENCY_BOUNDS_MS[-1], True
            low = 0.0 if i == 0 else LATENCY_BOUNDS_MS[i - 1]
            high = LATENCY_BOUNDS_MS[i]
            return low + (high - low) * (rank - seen) / count, False
        seen += count
    return LATENCY_BOUNDS_MS[-1], True


@dataclass(frozen=True)
class Summary:
    """What the requests of ``[start, end)`` add up to."""

    start: datetime
    end: datetime
    counts: Counts

    @property
    def seconds(self) -> float:
        """The range's length."""
        return max((self.end - self.start).total_seconds(), 1e-9)

    @property
    def qps(self) -> float:
        """Requests per second over the range."""
        return self.counts.requests / self.seconds

    def rate(self, part: int) -> float:
        """``part`` as a fraction of the requests (0 without requests)."""
        return part / self.counts.requests if self.counts.requests else 0.0

    def percentile(self, q: float) -> tuple[float, bool]:
        """See :func:`quantile`."""
        return quantile(self.counts.buckets, q)

    @property
    def mean_ms(self) -> float:
        """Mean latency (0 without requests)."""
        c = self.counts
        return c.latency_sum_ms / c.requests if c.requests else 0.0


def summarize(
    start: datetime, end: datetime, step: timedelta, minutes: Iterable[tuple[datetime, Counts]]
) -> tuple[Summary, list[Summary]]:
    """The whole range and one summary per ``step`` from ``start`` (empty steps too)."""
    steps = max(1, math.ceil((end - start) / step))
    series = [
        Summary(start + i * step, min(start + (i + 1) * step, end), Counts()) for i in range(steps)
    ]
    total = Counts()
    for minute, counts in minutes:
        index = int((minute - start) / step)
        if 0 <= index < steps:
            series[index].counts.add(counts)
            total.add(counts)
    return Summary(start, end, total), series
