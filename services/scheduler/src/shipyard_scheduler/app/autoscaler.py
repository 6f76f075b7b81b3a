"""The autoscaler: from the gateways' load reports to a replica target in range.

Gateways publish, every second, per deployment, the in-flight requests now and at peak
and the requests served (NATS core subject ``shipyard.load.gateway``, format in
``shipyard_gateway.load``). Losing a report is harmless (the next one replaces it), so
the reports are telemetry, not events; the decisions are events
(``DeploymentAutoscaled``).

Policy (Knative's, simplified): desired = ceil(sum of the gateways' peak in-flight /
target in-flight per instance), within [min, max]. Up at once; down only after the load
stayed lower for ``scale_down_delay``; to zero (min 0) only after no request for
``scale_to_zero_after``. A deployment at zero wakes through ``Activate`` (the gateway
calls it when a request arrives), not through reports.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

LOAD_SUBJECT = "shipyard.load.>"


@dataclass
class _Report:
    at: float
    inflight: float
    peak: float
    requests: int


class Autoscaler:
    """Keeps the freshest report of every gateway and decides targets."""

    def __init__(
        self,
        *,
        scale_down_delay: float = 30.0,
        scale_to_zero_after: float = 300.0,
        max_age: float = 5.0,
    ) -> None:
        self.scale_down_delay = scale_down_delay
        self.scale_to_zero_after = scale_to_zero_after
        self.max_age = max_age
        self._reports: dict[str, dict[str, _Report]] = {}
        self._last_busy: dict[str, float] = {}
        self._lower_since: dict[str, float] = {}
        self._current: dict[str, int] = {}

    def observe(self, data: bytes, now: float | None = None) -> None:
        """Takes one gateway report (malformed ones are ignored: telemetry)."""
        now = time.monotonic() if now is None else now
        try:
            report = json.loads(data)
            gateway = str(report["gateway"])
            deployments = report["deployments"]
            for name, load in deployments.items():
                r = _Report(
                    now,
                    float(load.get("inflight", 0)),
                    float(load.get("peak", load.get("inflight", 0))),
                    int(load.get("requests", 0)),
                )
                self._reports.setdefault(str(name), {})[gateway] = r
                if r.requests > 0 or r.inflight > 0:
                    self._last_busy[str(name)] = now
        except (ValueError, KeyError, TypeError, AttributeError):
            return

    def load(self, name: str, now: float) -> float:
        """The peak in-flight requests over every live gateway."""
        reports = self._reports.get(name, {})
        return sum(r.peak for r in reports.values() if now - r.at <= self.max_age)

    def decide(
        self,
        name: str,
        current: int,
        min_replicas: int,
        max_replicas: int,
        target_inflight: int,
        now: float | None = None,
    ) -> tuple[int, str] | None:
        """The new target and why, or None to stay."""
        now = time.monotonic() if now is None else now
        if current > 0 and self._current.get(name) == 0:
            # Woken from zero: the request that woke it waits for the cold start and is not
            # in any report yet. Count the wake-up as the last request, or the idle time
            # from before the sleep would put it right back to zero.
            self._last_busy[name] = now
        self._current[name] = current
        if min_replicas == max_replicas:
            self._lower_since.pop(name, None)
            return None
        load = self.load(name, now)
        idle = now - self._last_busy.setdefault(name, now)
        if load > 0:
            desired = math.ceil(load / max(target_inflight, 1))
        elif current == 0:
            return None  # asleep; Activate wakes it
        elif min_replicas == 0 and idle >= self.scale_to_zero_after:
            self._lower_since.pop(name, None)
            return 0, f"no request for {idle:.0f}s: scaled to zero"
        else:
            desired = max(min_replicas, 1)
        desired = min(max(desired, min_replicas), max_replicas)
        if desired > current:
            self._lower_since.pop(name, None)
            return desired, f"{load:g} requests in flight, target {target_inflight} per instance"
        if desired < current:
            since = self._lower_since.setdefault(name, now)
            if now - since >= self.scale_down_delay:
                self._lower_since.pop(name, None)
                return desired, f"{load:g} requests in flight for {now - since:.0f}s"
            return None
        self._lower_since.pop(name, None)
        return None

    def forget(self, name: str) -> None:
        """Drops what is known of a deployment (stopped or deleted)."""
        self._reports.pop(name, None)
        self._last_busy.pop(name, None)
        self._lower_since.pop(name, None)
        self._current.pop(name, None)
