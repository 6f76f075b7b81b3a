"""The autoscaler's policy, decided from load reports (pure: no broker needed)."""

from __future__ import annotations

import json

from shipyard_scheduler.app.autoscaler import Autoscaler


def _report(deployment: str, inflight: float, requests: int) -> bytes:
    load = {"inflight": inflight, "peak": inflight, "requests": requests}
    return json.dumps({"gateway": "g1", "deployments": {deployment: load}}).encode()


def test_scales_to_zero_only_after_the_idle_time() -> None:
    a = Autoscaler(scale_down_delay=30, scale_to_zero_after=3)
    a.observe(_report("d", 0, 5), now=100.0)
    assert a.decide("d", 1, 0, 2, 1, now=101.0) is None
    assert a.decide("d", 1, 0, 2, 1, now=103.5) == (0, "no request for 4s: scaled to zero")


def test_a_woken_deployment_is_not_put_back_to_sleep_at_once() -> None:
    a = Autoscaler(scale_down_delay=30, scale_to_zero_after=3)
    a.observe(_report("d", 0, 5), now=100.0)
    assert a.decide("d", 1, 0, 1, 1, now=104.0) == (0, "no request for 4s: scaled to zero")
    assert a.decide("d", 0, 0, 1, 1, now=105.0) is None  # asleep
    # Activate set replicas to 1 at t=200; the waiting request is in no report yet.
    assert a.decide("d", 1, 0, 1, 1, now=200.0) is None
    assert a.decide("d", 1, 0, 1, 1, now=202.0) is None
    # Then, with no request at all, it sleeps again after the idle time.
    assert a.decide("d", 1, 0, 1, 1, now=203.5) == (0, "no request for 4s: scaled to zero")


def test_scales_up_at_once_on_in_flight_requests() -> None:
    a = Autoscaler(scale_down_delay=30, scale_to_zero_after=300)
    a.observe(_report("d", 7, 7), now=10.0)
    assert a.decide("d", 1, 1, 5, 2, now=10.5) == (4, "7 requests in flight, target 2 per instance")
