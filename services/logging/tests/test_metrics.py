"""Request metrics on real NATS and PostgreSQL: gateway reports on METRICS in,
per-minute buckets and range summaries out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from shipyard.logging.v1 import metrics_pb2 as mpb
from shipyard.logging.v1 import metrics_pb2_grpc
from shipyard_core import bus
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_logging.domain.metrics import BUCKET_KEYS, quantile
from shipyard_testing import wait_for

from .conftest import Bus, Server, logging_settings, md, start_server, stop_server


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def report(
    gateway: str, seq: int, start: datetime, deployments: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """A gateway's METRICS body (shipyard_gateway/metrics.py documents it)."""
    return {
        "gateway": gateway,
        "seq": seq,
        "start": _iso(start),
        "end": _iso(start + timedelta(seconds=10)),
        "unrouted": 0,
        "deployments": deployments,
    }


def counts(ok: int, c4: int, c5: int, buckets: dict[str, int], **protocols: int) -> dict[str, Any]:
    """One deployment's interval: the buckets must add up to the requests."""
    requests = ok + c4 + c5
    assert sum(buckets.values()) == requests
    return {
        "requests": requests,
        "2xx": ok,
        "4xx": c4,
        "5xx": c5,
        "latency_ms_buckets": {k: buckets.get(k, 0) for k in BUCKET_KEYS},
        "latency_ms_sum": 7.0 * requests,
        "protocols": protocols or {"raw": requests},
    }


async def publish(nats_bus: Bus, body: dict[str, Any], msg_id: str | None = None) -> None:
    gateway, seq = body["gateway"], body["seq"]
    await nats_bus.js.publish(
        f"metrics.gateway.{gateway}",
        json.dumps(body).encode(),
        stream=bus.METRICS_STREAM,
        headers={"Nats-Msg-Id": msg_id or f"{gateway}-{seq}"},
    )


def stub(server: Server) -> metrics_pb2_grpc.MetricsServiceStub:
    return metrics_pb2_grpc.MetricsServiceStub(server.channel)


async def get(server: Server, token: str, deployment: str, **fields: Any) -> mpb.DeploymentMetrics:
    request = mpb.GetMetricsRequest(deployment=deployment, **fields)
    answer: mpb.DeploymentMetrics = await stub(server).GetMetrics(request, metadata=md(token))
    return answer


def test_percentiles_interpolate_within_the_bucket() -> None:
    buckets = [0] * len(BUCKET_KEYS)
    buckets[0] = 50  # (0, 5] ms
    buckets[2] = 50  # (10, 25] ms
    assert quantile(buckets, 0.5) == (5.0, False)
    assert quantile(buckets, 0.99) == pytest.approx((24.7, False))
    buckets[-1] = 900  # above 10 s
    assert quantile(buckets, 0.99) == (10000.0, True)
    assert quantile([0] * len(BUCKET_KEYS), 0.5) == (0.0, False)


async def test_buckets_count_every_request_by_class_exactly(server: Server, nats_bus: Bus) -> None:
    await nats_bus.created("iris", "team-a")
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    # Two gateways, three intervals of minute 1, one of minute 2, and another deployment.
    await publish(
        nats_bus,
        report(
            "gw-a",
            1,
            minute,
            {
                "iris": counts(90, 8, 2, {"5": 60, "10": 30, "25": 10}),
                "other": counts(5, 0, 0, {"5": 5}),
            },
        ),
    )
    await publish(
        nats_bus,
        report("gw-a", 2, minute + timedelta(seconds=10), {"iris": counts(10, 0, 0, {"50": 10})}),
    )
    await publish(
        nats_bus,
        report("gw-b", 7, minute + timedelta(seconds=20), {"iris": counts(0, 0, 10, {"+Inf": 10})}),
    )
    await publish(
        nats_bus,
        report(
            "gw-b",
            8,
            minute + timedelta(seconds=60),
            {"iris": counts(3, 1, 0, {"5": 4}, raw=2, **{"async": 2})},
        ),
    )
    # A redelivered report (the same gateway and seq under another message id) counts once.
    await publish(
        nats_bus,
        report("gw-a", 2, minute + timedelta(seconds=10), {"iris": counts(10, 0, 0, {"50": 10})}),
        msg_id="resent",
    )
    ingester = server.service.metrics_ingester
    await wait_for(lambda: ingester.reports == 4 and ingester.duplicates == 1, timeout=20)
    await wait_for(lambda: server.owners_known("iris"), message="owner never projected")

    since = minute
    until = minute + timedelta(minutes=2)
    answer = await get(
        server, "ana", "iris", since=to_timestamp(since), until=to_timestamp(until), step_minutes=1
    )
    total = answer.total
    assert (total.requests, total.status_2xx, total.status_4xx, total.status_5xx) == (
        124,
        103,
        9,
        12,
    )
    assert total.qps == pytest.approx(124 / 120)
    assert total.success_rate == pytest.approx(103 / 124)
    assert total.rate_4xx == pytest.approx(9 / 124)
    assert total.rate_5xx == pytest.approx(12 / 124)
    assert total.async_requests == 2
    # Cumulative buckets: 64 at 5 ms, 94 at 10, 104 at 25, 114 at 50, 124 above 10 s.
    assert total.latency_p50_ms == pytest.approx(5 * 62 / 64)
    assert total.latency_p95_ms == 10000 and total.latency_above_range
    assert total.latency_mean_ms == pytest.approx(7.0)
    assert [p.requests for p in answer.series] == [120, 4]
    assert answer.step_minutes == 1

    # Default range: the last hour, in 1-minute points (61: the first and the current
    # minute are partial), not 31 points of 2 minutes.
    hour = await get(server, "ana", "iris")
    assert hour.total.requests == 124 and hour.step_minutes == 1
    assert len(hour.series) == 61
    two = await get(
        server, "ana", "iris", since=to_timestamp(datetime.now(UTC) - timedelta(hours=2))
    )
    assert two.step_minutes == 2 and len(two.series) <= 61


async def test_metrics_of_another_group_are_not_found(server: Server, nats_bus: Bus) -> None:
    await nats_bus.created("iris", "team-a")
    await wait_for(lambda: server.owners_known("iris"), message="owner never projected")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get(server, "bob", "iris")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get(server, "ana", "iris", step_minutes=-1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("step_minutes:")


async def test_retention_drops_old_days_of_metrics(server: Server, nats_bus: Bus) -> None:
    await nats_bus.created("iris", "team-a")
    now = datetime.now(UTC)
    await publish(
        nats_bus, report("gw", 1, now - timedelta(days=2), {"iris": counts(1, 0, 0, {"5": 1})})
    )
    await publish(
        nats_bus, report("gw", 2, now - timedelta(days=4), {"iris": counts(1, 0, 0, {"5": 1})})
    )
    await publish(
        nats_bus, report("gw", 3, now - timedelta(minutes=1), {"iris": counts(1, 0, 0, {"5": 1})})
    )
    ingester = server.service.metrics_ingester
    await wait_for(lambda: _pending_zero(ingester), timeout=20, message="not consumed")
    assert ingester.reports == 2  # the 4-day-old one is past the retention

    ingester.clock = lambda: now + timedelta(days=2)
    async with server.service.svc.pool.acquire() as conn:
        assert len(await ingester.drop_expired(conn)) == 1
        rows = await conn.fetchval("SELECT count(*) FROM logging.metric_minutes")
    assert rows == 1


async def _pending_zero(ingester: Any) -> bool:
    return bool(await ingester.pending() == 0)


async def test_reports_sent_while_the_service_is_down_are_counted_once(
    database_url: str, nats_url: str, nats_bus: Bus
) -> None:
    await nats_bus.created("iris", "team-a")
    settings = logging_settings(database_url, nats_url)
    server = await start_server(settings)
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=2)
    await publish(nats_bus, report("gw", 1, minute, {"iris": counts(5, 0, 0, {"5": 5})}))
    await wait_for(lambda: server.service.metrics_ingester.reports == 1, timeout=20)
    await stop_server(server)
    await publish(nats_bus, report("gw", 2, minute, {"iris": counts(0, 3, 0, {"10": 3})}))
    # The first report again, under another message id (JetStream does not drop it).
    await publish(
        nats_bus, report("gw", 1, minute, {"iris": counts(5, 0, 0, {"5": 5})}), msg_id="again"
    )
    server = await start_server(settings)
    try:
        await wait_for(lambda: _pending_zero(server.service.metrics_ingester), timeout=20)
        await wait_for(lambda: server.owners_known("iris"), message="owner never projected")
        total = (await get(server, "ana", "iris")).total
        assert (total.requests, total.status_2xx, total.status_4xx) == (8, 5, 3)
    finally:
        await stop_server(server)
