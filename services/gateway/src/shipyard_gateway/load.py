"""In-flight load per deployment, reported on NATS for the scheduler's autoscaler.

Every ``load_report_interval_seconds`` each gateway process publishes one NATS core
message (not JetStream: a lost report is replaced by the next one a second later) on
subject ``shipyard.load.gateway`` whose body is JSON::

    {
      "gateway": "host-1234-a1b2c3",
      "interval": 1.002,
      "deployments": {
        "iris-prod": {"inflight": 3, "peak": 7, "requests": 120}
      }
    }

- ``gateway``: the id of the publishing process (``settings.gateway_id``, default
  ``<hostname>-<pid>-<random>``), unique per process: the autoscaler sums the latest
  report of every gateway and forgets a gateway that stopped reporting.
- ``interval``: seconds this report covers (measured, so about the setting).
- ``deployments``: every deployment with traffic since the previous report (a request
  arrived, or was in flight at some point) and every one with requests still in flight.
  ``inflight`` is the count at publication, ``peak`` the highest count during the
  interval, ``requests`` how many requests arrived in it.

A report is published every interval even when ``deployments`` is empty: it says "this
gateway is alive and saw no traffic", which is what lets a deployment scale to zero.
Counted are requests that passed routing and the access check (unknown deployments and
refused callers are not demand); a request waiting for a deployment to wake up counts,
because it is exactly the demand that should start instances.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from shipyard_core.aio import pause
from shipyard_gateway.nats_link import NatsLink

__all__ = ["LOAD_SUBJECT", "LoadReporter", "LoadTracker"]

log = logging.getLogger(__name__)

LOAD_SUBJECT = "shipyard.load.gateway"
"""The NATS subject of load reports."""


@dataclass
class _Load:
    inflight: int = 0
    """Callers' requests in flight (what the concurrency limit counts)."""
    batched: int = 0
    """Requests of async workers' batch calls in flight (load, not callers)."""
    peak: int = 0
    requests: int = 0

    @property
    def total(self) -> int:
        return self.inflight + self.batched


class LoadTracker:
    """Counts requests per deployment: in flight now, the peak and the arrivals since the
    last :meth:`take_report`. Event-loop only (no locks)."""

    def __init__(self) -> None:
        self._loads: dict[str, _Load] = {}

    def _load(self, deployment: str) -> _Load:
        load = self._loads.get(deployment)
        if load is None:
            load = self._loads[deployment] = _Load()
        return load

    @contextmanager
    def track(self, deployment: str) -> Iterator[None]:
        """Counts one request to ``deployment`` for the ``with`` body."""
        load = self._load(deployment)
        load.requests += 1
        load.inflight += 1
        load.peak = max(load.peak, load.total)
        try:
            yield
        finally:
            load.inflight -= 1

    @contextmanager
    def track_batch(self, deployment: str, requests: int) -> Iterator[None]:
        """Counts the ``requests`` of an async worker's batch call for the ``with`` body:
        load the autoscaler sees, but not in :meth:`inflight` (the callers' concurrency
        limit): a worker's calls are bounded by its own concurrency, and a refusal would
        cost its requests an attempt."""
        load = self._load(deployment)
        load.requests += requests
        load.batched += requests
        load.peak = max(load.peak, load.total)
        try:
            yield
        finally:
            load.batched -= requests

    def inflight(self, deployment: str) -> int:
        """Callers' requests to ``deployment`` in flight now (not async batch calls)."""
        load = self._loads.get(deployment)
        return load.inflight if load is not None else 0

    def take_report(self) -> dict[str, dict[str, int]]:
        """The ``deployments`` part of a report, and a new interval starts: deployments
        with traffic in the interval or requests in flight; peaks restart at the current
        count, arrivals at zero."""
        report: dict[str, dict[str, int]] = {}
        for name, load in list(self._loads.items()):
            # peak > 0: a request was in flight during the interval, even if it arrived
            # before it and finished within it (a long prediction is load too).
            if load.requests or load.total or load.peak:
                report[name] = {
                    "inflight": load.total,
                    "peak": load.peak,
                    "requests": load.requests,
                }
            if load.total:
                load.peak = load.total
                load.requests = 0
            else:
                # Idle: forget it (a request makes a fresh entry; the dict stays as small
                # as the set of busy deployments).
                del self._loads[name]
        return report


class LoadReporter:
    """Publishes a :class:`LoadTracker`'s report every ``interval`` seconds (a ServiceHost
    background task) on the gateway's NATS connection."""

    def __init__(
        self,
        tracker: LoadTracker,
        link: NatsLink,
        *,
        gateway_id: str,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker
        self.link = link
        self.gateway_id = gateway_id
        self.interval = interval
        self._clock = clock
        self._last = clock()

    def message(self, interval: float) -> dict[str, Any]:
        """The next report (and a new interval starts), as a JSON-ready dict."""
        return {
            "gateway": self.gateway_id,
            "interval": round(interval, 3),
            "deployments": self.tracker.take_report(),
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Connects (retrying until NATS is reachable: predictions never wait for it), then
        reports every interval until ``stop``, and once more on the way out."""
        if await self.link.connect(stop) is None:
            return
        self._last = self._clock()
        while not stop.is_set():
            await pause(stop, self.interval)
            await self.publish()
        # The last partial interval: traffic just before a shutdown is demand too.
        await self.publish()

    async def publish(self) -> None:
        """Publishes the report of the interval that ends now (no-op before connecting)."""
        nc = self.link.nc
        if nc is None:
            return
        now = self._clock()
        body = json.dumps(self.message(now - self._last), separators=(",", ":")).encode()
        self._last = now
        try:
            await nc.publish(LOAD_SUBJECT, body)
        except Exception as exc:
            # Load reports are telemetry: one lost while NATS reconnects is replaced by the
            # next; it must never take the gateway down.
            log.warning("cannot publish the load report: %r", exc)
