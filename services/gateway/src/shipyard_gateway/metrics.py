"""Request metrics: aggregated in memory, published to the ``METRICS`` JetStream stream.

Every request to a deployment (REST in any protocol shape, gRPC) is recorded with its
deployment, HTTP status (a gRPC code counts as its HTTP equivalent), latency and protocol
(:meth:`MetricsRecorder.record`: a few integer increments, no I/O, no allocation once the
deployment has an entry). Every ``metrics_interval_seconds`` (default 10)
the interval is cut and published by a background task as ONE JetStream message per
gateway process on subject ``metrics.gateway.<gateway id>`` (the id with every character
other than letters, digits, ``-`` and ``_`` replaced by ``_``), stream ``METRICS``
(``shipyard_core.bus``; 3 days), with header ``Nats-Msg-Id: <gateway id>-<seq>`` so a
message sent twice (a lost acknowledgement) is stored once. The body is JSON::

    {
      "gateway": "host-1234-a1b2c3",
      "seq": 42,
      "start": "2025-01-31T12:00:00.000Z",
      "end": "2025-01-31T12:00:10.001Z",
      "unrouted": 0,
      "deployments": {
        "iris-prod": {
          "requests": 1200,
          "2xx": 1190, "4xx": 9, "5xx": 1,
          "latency_ms_buckets": {"5": 1100, "10": 80, "25": 15, "50": 3, "100": 1,
                                 "250": 1, "500": 0, "1000": 0, "2500": 0, "5000": 0,
                                 "10000": 0, "+Inf": 0},
          "latency_ms_sum": 3120.5,
          "protocols": {"v2": 1000, "raw": 200}
        }
      }
    }

- ``gateway``: the publishing process (``settings.gateway_id``, default
  ``<hostname>-<pid>-<random>``); ``seq``: 1, 2, 3, ... per process, one per interval (a
  gap means intervals lost, see below).
- ``start``, ``end``: the interval, UTC, RFC 3339 with milliseconds. Consecutive messages
  of one gateway tile time: a message's ``start`` is the previous one's ``end``.
- ``unrouted``: requests naming a deployment this gateway does not know (all 404s; not
  keyed by name, since callers choose those names).
- ``deployments``: every deployment with at least one request in the interval (an idle
  gateway publishes ``{}``, which says "alive, no traffic"):
  ``requests`` = ``2xx`` + ``4xx`` + ``5xx`` (a status below 400 counts as ``2xx``);
  ``latency_ms_buckets``: how many requests took at most that many milliseconds and more
  than the previous bound (NOT cumulative; ``+Inf``: above 10 s), the latency being
  measured from the request read to the answer ready, model server included;
  ``latency_ms_sum``: their sum in milliseconds (mean = sum / requests); ``protocols``:
  requests per protocol (``v2``, ``v1``, ``seldon``, ``raw``, ``grpc``; ``async`` later).

What is counted: every request to a deployment route (inference, model metadata and
readiness), whatever its outcome, including 401/403/429/503; not the server-level health
and metadata routes, nor requests the caller abandoned before the answer (cancelled).

A publish that fails (NATS down, no acknowledgement in time) keeps its message, with its
id, and is retried before the next one, oldest first, up to ``metrics_max_pending``
intervals; beyond that the oldest is dropped with a warning saying how many requests it
held. Asynchronous requests will be counted through the same :meth:`MetricsRecorder.record`
with ``protocol="async"`` (the hook; the async path is not in the gateway yet).

The same counts also feed ``GET /metrics`` and the OpenTelemetry export
(:mod:`shipyard_gateway.prometheus`), which need totals since the process started rather
than intervals. So the recorder keeps ONE set of counters per deployment, cumulative and
never reset (:meth:`MetricsRecorder.record` is the same handful of increments as before),
and :meth:`MetricsRecorder.take` cuts an interval as the difference from the totals at the
previous cut. A scrape reads the totals as they are: nothing is added to a request's path
for it. Totals of a deployment that left the routing table are forgotten at the first cut
without traffic for it (its series end, as Prometheus expects of a removed target).
Upstream failures (``PredictHandler``'s ``on_upstream_error``, which knows the
deployment) are counted on the failure path only and are not part of the ``METRICS``
message.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shipyard_core.aio import pause
from shipyard_core.bus import ensure_streams
from shipyard_gateway.nats_link import NatsLink

__all__ = [
    "LATENCY_BOUNDS_MS",
    "UPSTREAM_ERROR_KINDS",
    "DeploymentCounts",
    "MetricsPublisher",
    "MetricsRecorder",
    "metrics_subject",
]

log = logging.getLogger(__name__)

LATENCY_BOUNDS_MS: tuple[float, ...] = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
"""Upper bounds of the latency buckets, in milliseconds (then ``+Inf``)."""

_BUCKET_KEYS = (*(f"{bound:g}" for bound in LATENCY_BOUNDS_MS), "+Inf")

_SUBJECT_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def metrics_subject(gateway_id: str) -> str:
    """``metrics.gateway.<gateway_id sanitised>``: dots, wildcards and spaces would change
    what the subject means."""
    return f"metrics.gateway.{_SUBJECT_UNSAFE.sub('_', gateway_id) or '_'}"


def _utc(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DeploymentCounts:
    """One deployment's counts since the process started (plain attributes: recording a
    request is a handful of increments). Read-only outside :class:`MetricsRecorder`."""

    __slots__ = ("buckets", "client_errors", "latency_sum", "ok", "protocols", "server_errors")

    def __init__(self) -> None:
        self.ok = 0
        """Requests answered with a status below 400."""
        self.client_errors = 0
        """Requests answered 4xx."""
        self.server_errors = 0
        """Requests answered 5xx."""
        self.buckets = [0] * len(_BUCKET_KEYS)
        """Requests per latency bucket (:data:`LATENCY_BOUNDS_MS`, then ``+Inf``); NOT
        cumulative."""
        self.latency_sum = 0.0
        """Sum of the latencies, in milliseconds."""
        self.protocols: dict[str, int] = {}
        """Requests per protocol."""

    @property
    def requests(self) -> int:
        """Every request counted."""
        return self.ok + self.client_errors + self.server_errors

    def copy(self) -> DeploymentCounts:
        """A snapshot (the counts at a cut)."""
        out = DeploymentCounts()
        out.ok, out.client_errors, out.server_errors = (
            self.ok,
            self.client_errors,
            self.server_errors,
        )
        out.buckets = list(self.buckets)
        out.latency_sum = self.latency_sum
        out.protocols = dict(self.protocols)
        return out

    def document_since(self, before: DeploymentCounts | None) -> dict[str, Any]:
        """The message's entry for the requests counted since ``before`` (a snapshot of
        these counts; None: since the start)."""
        if before is None:
            before = _ZERO
        ok = self.ok - before.ok
        client_errors = self.client_errors - before.client_errors
        server_errors = self.server_errors - before.server_errors
        protocols = {
            name: count - before.protocols.get(name, 0)
            for name, count in self.protocols.items()
            if count != before.protocols.get(name, 0)
        }
        return {
            "requests": ok + client_errors + server_errors,
            "2xx": ok,
            "4xx": client_errors,
            "5xx": server_errors,
            "latency_ms_buckets": {
                key: now - then
                for key, now, then in zip(_BUCKET_KEYS, self.buckets, before.buckets, strict=True)
            },
            # A difference of two sums: rounded, so it does not show float noise.
            "latency_ms_sum": round(self.latency_sum - before.latency_sum, 3),
            "protocols": protocols,
        }


_ZERO = DeploymentCounts()

UPSTREAM_ERROR_KINDS = ("connect", "timeout", "broken")
"""How a model server call failed: ``connect`` (no connection could be made; the request
went to another instance if there was one), ``timeout`` (no answer in time: 504),
``broken`` (the exchange broke after the request was sent: 502)."""


class MetricsRecorder:
    """The in-memory counts of requests. Event-loop only (no locks); other threads (the
    OpenTelemetry reader) may read the counts, never write them.

    ``known`` tells whether a deployment exists (the routing table): requests naming
    anything else are only counted in ``unrouted``, so callers cannot grow the aggregate
    with names of their choosing.
    """

    def __init__(self, known: Callable[[str], bool] | None = None) -> None:
        self._known = known
        self._stats: dict[str, DeploymentCounts] = {}
        self._taken: dict[str, DeploymentCounts] = {}  # the counts at the last cut
        self.unrouted_total = 0
        """Requests naming an unknown deployment since the start."""
        self._unrouted_taken = 0
        self.upstream_errors: dict[tuple[str, str], int] = {}
        """Failed model server calls since the start by ``(deployment, kind)`` (kind: one
        of :data:`UPSTREAM_ERROR_KINDS`; deployment ``""`` when the address no longer
        belonged to any)."""
        self.latency_observer: Callable[[str, float], None] | None = None
        """Called with ``(deployment, seconds)`` for each request of a known deployment
        when set (the OpenTelemetry histogram, which has no asynchronous form); None by
        default, which costs one comparison."""

    @property
    def unrouted(self) -> int:
        """Requests naming an unknown deployment in the current interval."""
        return self.unrouted_total - self._unrouted_taken

    def record(self, deployment: str, status: int, seconds: float, protocol: str) -> None:
        """Counts one finished request: ``status`` is the HTTP status the caller got (or
        the HTTP equivalent of a gRPC code), ``seconds`` its latency, ``protocol`` one of
        :data:`shipyard_gateway.protocols.PROTOCOLS`."""
        stats = self._stats.get(deployment)
        if stats is None:
            if self._known is not None and not self._known(deployment):
                self.unrouted_total += 1
                return
            stats = self._stats[deployment] = DeploymentCounts()
        if status < 400:
            stats.ok += 1
        elif status < 500:
            stats.client_errors += 1
        else:
            stats.server_errors += 1
        milliseconds = seconds * 1000.0
        stats.buckets[bisect.bisect_left(LATENCY_BOUNDS_MS, milliseconds)] += 1
        stats.latency_sum += milliseconds
        protocols = stats.protocols
        protocols[protocol] = protocols.get(protocol, 0) + 1
        if self.latency_observer is not None:
            self.latency_observer(deployment, seconds)

    def record_upstream_error(self, deployment: str, kind: str) -> None:
        """Counts one failed model server call (``kind``: :data:`UPSTREAM_ERROR_KINDS`)."""
        key = (deployment, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def totals(self) -> list[tuple[str, DeploymentCounts]]:
        """``(deployment, counts since the start)`` of every deployment counted (the live
        objects: read them, do not keep them)."""
        return list(self._stats.items())

    def take(self) -> tuple[dict[str, dict[str, Any]], int]:
        """The counts of the interval that ends now, as ``(deployments, unrouted)`` in the
        message's shape (deployments with at least one request in it); a new interval
        starts. Totals of deployments without requests in the interval that are no longer
        known are forgotten."""
        deployments: dict[str, dict[str, Any]] = {}
        for name, stats in list(self._stats.items()):
            before = self._taken.get(name)
            if stats.requests != (before.requests if before is not None else 0):
                deployments[name] = stats.document_since(before)
                self._taken[name] = stats.copy()
            elif self._known is not None and not self._known(name):
                del self._stats[name]
                self._taken.pop(name, None)
                for key in [key for key in self.upstream_errors if key[0] == name]:
                    del self.upstream_errors[key]
        unrouted = self.unrouted
        self._unrouted_taken = self.unrouted_total
        return deployments, unrouted


@dataclass
class _Pending:
    msg_id: str
    body: bytes
    requests: int


class MetricsPublisher:
    """Cuts the recorder's interval every ``interval`` seconds and publishes it to
    JetStream (a ServiceHost background task); see the module docstring."""

    def __init__(
        self,
        recorder: MetricsRecorder,
        link: NatsLink,
        *,
        gateway_id: str,
        interval: float,
        max_pending: int = 60,
        publish_timeout: float = 5.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.recorder = recorder
        self.link = link
        self.gateway_id = gateway_id
        self.subject = metrics_subject(gateway_id)
        self.interval = interval
        self.max_pending = max_pending
        self.publish_timeout = publish_timeout
        self._wall = wall_clock
        self._start = wall_clock()
        self._seq = 0
        self._pending: deque[_Pending] = deque()
        self._streams_ensured = False
        self._failing = False
        self.published = 0
        """Messages acknowledged by JetStream (for tests and logs)."""
        self.dropped_requests = 0
        """Requests in intervals dropped because too many were pending."""

    @property
    def pending(self) -> int:
        """Intervals cut but not yet acknowledged."""
        return len(self._pending)

    async def run(self, stop: asyncio.Event) -> None:
        """Every interval until ``stop``: cut it and publish what is pending; once more
        on the way out. Intervals are cut on time even while NATS is unreachable."""
        self._start = self._wall()
        loop = asyncio.get_running_loop()
        connecting = asyncio.ensure_future(self.link.connect(stop))
        # A failed connect must not go unnoticed as "exception was never retrieved".
        connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
        next_cut = loop.time() + self.interval
        try:
            while True:
                # On a fixed schedule, so publishing time does not stretch the intervals.
                await pause(stop, max(0.0, next_cut - loop.time()))
                if stop.is_set():
                    break
                next_cut += self.interval
                await self.publish()
        finally:
            connecting.cancel()
        # The last partial interval: requests just before a shutdown are counted too.
        await self.publish()

    def cut(self) -> None:
        """Ends the current interval: its message joins the pending ones."""
        now = self._wall()
        deployments, unrouted = self.recorder.take()
        self._seq += 1
        document = {
            "gateway": self.gateway_id,
            "seq": self._seq,
            "start": _utc(self._start),
            "end": _utc(now),
            "unrouted": unrouted,
            "deployments": deployments,
        }
        self._start = now
        body = json.dumps(document, separators=(",", ":")).encode()
        requests = unrouted + sum(entry["requests"] for entry in deployments.values())
        self._pending.append(_Pending(f"{self.gateway_id}-{self._seq}", body, requests))
        while len(self._pending) > self.max_pending:
            lost = self._pending.popleft()
            self.dropped_requests += lost.requests
            log.warning(
                "metrics interval %s dropped (%d requests): more than %d intervals could not "
                "be published",
                lost.msg_id,
                lost.requests,
                self.max_pending,
            )

    async def publish(self) -> None:
        """Cuts the current interval, then sends the pending messages, oldest first,
        stopping at the first failure (kept for the next attempt)."""
        self.cut()
        await self.flush()

    async def flush(self) -> None:
        """Sends the pending messages, oldest first; a failure keeps it and the rest."""
        nc = self.link.nc
        if nc is None or not self._pending:
            return
        js = nc.jetstream(timeout=self.publish_timeout)
        try:
            if not self._streams_ensured:
                await ensure_streams(js)
                self._streams_ensured = True
            while self._pending:
                message = self._pending[0]
                await js.publish(
                    self.subject,
                    message.body,
                    timeout=self.publish_timeout,
                    headers={"Nats-Msg-Id": message.msg_id},
                )
                self._pending.popleft()
                self.published += 1
        except Exception as exc:
            # Telemetry must never take the gateway down; one warning per outage.
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot publish gateway metrics (%r); %d interval(s) kept for retry",
                    exc,
                    len(self._pending),
                )
            return
        if self._failing:
            self._failing = False
            log.info("gateway metrics published again")
