"""The gateway's parts on their own: routing table, load tracker, error table, settings."""

from __future__ import annotations

import asyncio

import pytest

from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard_core.errors import NotFound, PermissionDenied, Unauthenticated, Unavailable
from shipyard_gateway.errors import (
    BadGateway,
    DeploymentStopped,
    PayloadTooLarge,
    UpstreamTimeout,
    http_status_for_exception,
)
from shipyard_gateway.load import LoadTracker
from shipyard_gateway.routing import Access, Route, RoutingTable
from shipyard_gateway.settings import GatewaySettings
from shipyard_testing import wait_for


def test_route_from_update() -> None:
    update = pb.RouteUpdate(
        deployment="iris",
        group="team-a",
        access=pb.ACCESS_PUBLIC,
        revision=3,
        addresses=["a:1", "b:2", "a:1", ""],
        max_inflight=8,
    )
    route = Route.from_update(update)
    assert route == Route("iris", "team-a", Access.PUBLIC, 3, ("a:1", "b:2"), max_inflight=8)
    assert route.ready
    # Unspecified access is treated as private.
    assert Route.from_update(pb.RouteUpdate(deployment="x")).access is Access.PRIVATE


def test_pick_least_outstanding_then_round_robin() -> None:
    table = RoutingTable()
    table.update(Route("iris", "g", addresses=("a", "b", "c")))
    # All idle: ties go round robin.
    assert [table.pick("iris") for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    with table.track("a"), table.track("b"):
        assert {table.pick("iris") for _ in range(3)} == {"c"}
        with table.track("c"), table.track("c"):
            # a and b have one each, c two.
            assert {table.pick("iris") for _ in range(4)} == {"a", "b"}
        assert table.pick("iris", exclude={"c"}) in {"a", "b"}
    assert table.inflight("a") == table.inflight("c") == 0
    assert table.pick("iris", exclude={"a", "b", "c"}) is None
    assert table.pick("unknown") is None


def test_unreachable_addresses_are_passed_over_for_a_while() -> None:
    now = [100.0]
    table = RoutingTable(clock=lambda: now[0])
    table.update(Route("iris", "g", addresses=("a", "b")))
    table.unreachable("a", 5)
    assert {table.pick("iris") for _ in range(4)} == {"b"}
    # Nothing else left: the marked one is tried rather than failing the request.
    assert table.pick("iris", exclude={"b"}) == "a"
    now[0] += 5
    assert {table.pick("iris") for _ in range(4)} == {"a", "b"}


async def test_wait_ready_is_woken_by_updates() -> None:
    table = RoutingTable()
    table.replace([Route("iris", "g", scaled_to_zero=True)])
    assert table.synced
    waiter = asyncio.ensure_future(table.wait_ready("iris", 10))
    await wait_for(lambda: "iris" in table._waiters, message="waiting")
    table.update(Route("iris", "g", scaled_to_zero=False))  # starting: not ready yet
    assert "iris" not in table._waiters  # woken to re-check...
    await wait_for(lambda: "iris" in table._waiters, message="waiting again")
    assert not waiter.done()  # ...and waiting again
    table.update(Route("iris", "g", addresses=("a",)))
    route = await asyncio.wait_for(waiter, 5)
    assert route is not None and route.addresses == ("a",)


async def test_wait_ready_gives_up_on_timeout_stop_and_removal() -> None:
    table = RoutingTable()
    table.replace([Route("a", "g"), Route("b", "g"), Route("c", "g")])
    assert await table.wait_ready("a", 0.05) is None
    stopped = asyncio.ensure_future(table.wait_ready("b", 10))
    removed = asyncio.ensure_future(table.wait_ready("c", 10))
    await wait_for(lambda: {"b", "c"} <= set(table._waiters), message="both waiting")
    table.update(Route("b", "g", stopped=True))
    table.replace([Route("a", "g")])  # a new snapshot without c
    assert await asyncio.wait_for(stopped, 5) is None
    assert await asyncio.wait_for(removed, 5) is None
    assert not table._waiters  # nothing lingers


def test_replace_drops_absent_deployments() -> None:
    table = RoutingTable()
    table.update(Route("old", "g", addresses=("a",)))
    table.replace([Route("new", "g", addresses=("b",))])
    assert set(table.routes()) == {"new"}
    assert "old" not in table


def test_load_tracker_report() -> None:
    tracker = LoadTracker()
    with tracker.track("iris"), tracker.track("iris"):
        pass
    with tracker.track("iris"):
        report = tracker.take_report()
        assert report == {"iris": {"inflight": 1, "peak": 2, "requests": 3}}
        # Still in flight: reported again, with a fresh interval.
        assert tracker.take_report() == {"iris": {"inflight": 1, "peak": 1, "requests": 0}}
    assert tracker.take_report() == {"iris": {"inflight": 0, "peak": 1, "requests": 0}}
    assert tracker.take_report() == {}  # idle deployments are dropped


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotFound("x"), 404),
        (Unauthenticated("x"), 401),
        (PermissionDenied("x"), 403),
        (Unavailable("x"), 503),
        (DeploymentStopped("iris"), 503),
        (UpstreamTimeout("x"), 504),
        (BadGateway("x"), 502),
        (PayloadTooLarge("x"), 413),
    ],
)
def test_http_status_table(error: Exception, status: int) -> None:
    assert http_status_for_exception(error)[0] == status


def test_unexpected_errors_are_generic() -> None:
    status, message = http_status_for_exception(RuntimeError("secret detail"))
    assert status == 500
    assert "secret detail" not in message and "reference" in message


def test_settings_defaults_and_documentation() -> None:
    settings = GatewaySettings()
    assert (settings.service_name, settings.grpc_port, settings.http_port) == (
        "gateway",
        8081,
        8080,
    )
    assert settings.scheduler_addr == "127.0.0.1:50054"
    assert settings.max_body_bytes == 32 * 1024 * 1024
    undocumented = [
        name for name, field in GatewaySettings.model_fields.items() if not field.description
    ]
    assert undocumented == []
