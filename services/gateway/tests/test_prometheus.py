"""``GET /metrics``: the Prometheus exposition of the gateway's request counters, checked
after real predictions through the gateway to real model servers, parsed strictly; who
may see which deployment; and the same counters over OpenTelemetry (an in-memory reader,
and OTLP to a stand-in collector)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from shipyard_gateway.load import LoadTracker
from shipyard_gateway.main import GatewayHost
from shipyard_gateway.metrics import MetricsRecorder
from shipyard_gateway.prometheus import (
    CONTENT_TYPE,
    DURATION,
    FAMILIES,
    IN_FLIGHT,
    INFO,
    OTEL_DURATION,
    OTEL_IN_FLIGHT,
    OTEL_REQUESTS,
    OTEL_UNROUTED,
    OTEL_UPSTREAM_ERRORS,
    REQUESTS,
    SAMPLE_NAMES,
    UNROUTED,
    UPSTREAM_ERRORS,
    GatewayMetrics,
    export_to_opentelemetry,
)
from shipyard_gateway.routing import Access, Route, RoutingTable
from shipyard_testing import wait_for

from .conftest import FakeScheduler, MakeGateway, ModelServer, free_port_address, publish, route
from .test_gateway import ROWS
from .test_limits_and_metrics import read_metrics

SCRAPE_TOKEN = "scrape-secret"
LE = ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf")


# --- a strict parser of the text format (prometheus_client is not a dependency) -------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_LABEL = rf"[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE}"
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)(?: (-?\d+))?")
_HELP = re.compile(rf"# HELP ({_NAME}) ((?:[^\\\n]|\\[\\n])*)")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")
_ONE_LABEL = re.compile(rf"([a-zA-Z_][a-zA-Z0-9_]*)=({_LABEL_VALUE})")
_FLOAT = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|Inf)|NaN")

Series = tuple[str, frozenset[tuple[str, str]]]


def _unescape(quoted: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), quoted[1:-1])


@dataclass
class Exposition:
    """A parsed exposition: family types and helps, and every sample's value."""

    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    samples: dict[Series, float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(ls)[label] for n, ls in self.samples if n == name and label in dict(ls)}


def _family_of(name: str, types: dict[str, str]) -> str:
    if name in types:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and types.get(base) == "histogram":
            return base
    raise AssertionError(f"sample {name} has no # TYPE before it")


def parse(text: str) -> Exposition:
    """Parses ``text`` in the Prometheus text format 0.0.4, rejecting anything Prometheus
    would reject (and what it would accept but is wrong: interleaved families, duplicate
    series, histograms whose buckets are not cumulative or miss ``+Inf``)."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    out = Exposition()
    finished: set[str] = set()
    current = ""
    for line in text[:-1].split("\n"):
        if m := _HELP.fullmatch(line):
            assert m.group(1) not in out.helps, f"second HELP for {m.group(1)}"
            out.helps[m.group(1)] = m.group(2)
            continue
        if m := _TYPE.fullmatch(line):
            name = m.group(1)
            assert name not in out.types, f"second TYPE for {name}"
            assert name not in finished, f"TYPE of {name} after its samples"
            out.types[name] = m.group(2)
            continue
        assert not line.startswith("#"), f"unexpected comment {line!r}"
        m = _SAMPLE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        name, labels_text, value_text = m.group(1), m.group(2) or "", m.group(3)
        assert _FLOAT.fullmatch(value_text), f"bad value in {line!r}"
        family = _family_of(name, out.types)
        if family != current:
            assert family not in finished, f"samples of {family} are not together"
            if current:
                finished.add(current)
            current = family
        labels = [(k, _unescape(v)) for k, v in _ONE_LABEL.findall(labels_text)]
        assert len({k for k, _ in labels}) == len(labels), f"repeated label in {line!r}"
        series = (name, frozenset(labels))
        assert series not in out.samples, f"duplicate series {line!r}"
        out.samples[series] = float(value_text)
    for family, kind in out.types.items():
        if kind == "histogram":
            _check_histogram(out, family)
    return out


def _check_histogram(out: Exposition, family: str) -> None:
    groups: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
    for (name, labels), value in out.samples.items():
        if name == f"{family}_bucket":
            le = dict(labels)["le"]
            rest = frozenset((k, v) for k, v in labels if k != "le")
            groups.setdefault(rest, []).append((float(le), value))
    for rest, buckets in groups.items():
        buckets.sort()
        assert buckets[-1][0] == math.inf, f"{family}{dict(rest)} has no +Inf bucket"
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), f"{family}{dict(rest)} buckets are not cumulative"
        assert out.samples[(f"{family}_count", rest)] == counts[-1]
        assert (f"{family}_sum", rest) in out.samples


# --- units ----------------------------------------------------------------------------------


def test_exposition_is_strict_text_format_with_escaped_labels() -> None:
    table = RoutingTable()
    odd = 'we"ird\\name\nhere'
    table.update(Route("iris", "team-a", Access.PUBLIC, 1, ("127.0.0.1:1",)))
    table.update(Route(odd, "team-a", Access.PUBLIC, 1, ("127.0.0.1:2",)))
    recorder = MetricsRecorder(known=table.__contains__)
    recorder.record("iris", 200, 0.004, "raw")  # the 5 ms bucket
    recorder.record("iris", 503, 0.030, "v2")  # the 50 ms bucket
    recorder.record(odd, 404, 20.0, "raw")  # +Inf
    recorder.record("nope", 404, 0.001, "raw")
    recorder.record_upstream_error("iris", "timeout")
    metrics = GatewayMetrics(recorder, table, LoadTracker(), version="1.2.3", gateway_id='g"1')
    text = metrics.render().decode()
    parsed = parse(text)

    assert set(parsed.types) == set(FAMILIES)
    assert {name for name, _ in parsed.samples} <= SAMPLE_NAMES
    assert parsed.label_values(REQUESTS, "deployment") == {"iris", odd}
    assert parsed.value(REQUESTS, deployment="iris", status_class="2xx") == 1
    assert parsed.value(REQUESTS, deployment="iris", status_class="5xx") == 1
    assert parsed.value(REQUESTS, deployment=odd, status_class="4xx") == 1
    buckets = [parsed.value(f"{DURATION}_bucket", deployment="iris", le=le) for le in LE]
    assert buckets == [1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    assert parsed.value(f"{DURATION}_sum", deployment="iris") == pytest.approx(0.034)
    assert parsed.value(f"{DURATION}_bucket", deployment=odd, le="10") == 0
    assert parsed.value(f"{DURATION}_bucket", deployment=odd, le="+Inf") == 1
    assert parsed.value(UPSTREAM_ERRORS, deployment="iris", kind="timeout") == 1
    assert parsed.value(UPSTREAM_ERRORS, deployment="iris", kind="connect") == 0
    assert parsed.value(UNROUTED) == 1
    assert parsed.value(INFO, version="1.2.3", gateway='g"1') == 1
    # The exact lines of one deployment, as Prometheus reads them.
    assert 'shipyard_gateway_requests_total{deployment="iris",status_class="2xx"} 1\n' in text
    assert 'deployment="we\\"ird\\\\name\\nhere"' in text
    first_bucket = f'{DURATION}_bucket{{deployment="iris",le="0.005"}} 1\n'
    assert first_bucket in text
    assert f"# TYPE {DURATION} histogram\n" in text
    assert parsed.value("process_cpu_seconds_total") > 0
    assert parsed.value("process_resident_memory_bytes") > 1_000_000


def test_the_metrics_stream_cut_does_not_reset_the_totals() -> None:
    recorder = MetricsRecorder()
    recorder.record("iris", 200, 0.001, "raw")
    recorder.record("iris", 500, 0.002, "v2")
    deployments, _ = recorder.take()
    assert (deployments["iris"]["2xx"], deployments["iris"]["5xx"]) == (1, 1)
    recorder.record("iris", 200, 0.001, "raw")
    deployments, _ = recorder.take()
    # The interval has the difference; the totals go on.
    assert deployments["iris"]["requests"] == 1
    assert deployments["iris"]["protocols"] == {"raw": 1}
    assert sum(deployments["iris"]["latency_ms_buckets"].values()) == 1
    assert deployments["iris"]["latency_ms_sum"] == pytest.approx(1.0)
    ((name, totals),) = recorder.totals()
    assert (name, totals.ok, totals.server_errors, totals.requests) == ("iris", 2, 1, 3)
    assert recorder.take() == ({}, 0)


def test_totals_of_removed_deployments_are_forgotten_after_a_quiet_cut() -> None:
    known = {"iris", "gone"}
    recorder = MetricsRecorder(known=known.__contains__)
    recorder.record("gone", 200, 0.001, "raw")
    recorder.record_upstream_error("gone", "connect")
    known.discard("gone")
    deployments, _ = recorder.take()
    assert deployments["gone"]["requests"] == 1  # its last requests are still published
    assert [name for name, _ in recorder.totals()] == ["gone"]
    recorder.take()
    assert recorder.totals() == [] and recorder.upstream_errors == {}


# --- end to end: real predictions, then a scrape -------------------------------------------


async def _scrape(
    http: aiohttp.ClientSession, gateway: GatewayHost, token: str | None = SCRAPE_TOKEN
) -> tuple[int, str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(f"{gateway.http_url}/metrics", headers=headers) as resp:
        return resp.status, await resp.text(), resp.headers


async def test_metrics_after_real_predictions(
    make_gateway: MakeGateway,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
    nats_url: str,
) -> None:
    gateway = await make_gateway(metrics_token=SCRAPE_TOKEN, metrics_interval_seconds=0.3)
    await publish(
        scheduler,
        gateway,
        route("iris", iris[0].address, iris[1].address),
        route("vault", iris[0].address, public=False),  # team-a, private
        route("down", free_port_address(), group="team-b"),
    )
    base = gateway.http_url

    async def send(path: str, expect: int, token: str = "", **kw: Any) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with http.post(f"{base}{path}", headers=headers, **kw) as resp:
            assert resp.status == expect, await resp.text()

    for _ in range(4):
        await send("/deployments/iris/predict", 200, json=ROWS)
    await send("/v2/models/iris/infer", 400, json={"inputs": []})
    async with http.get(f"{base}/v2/models/iris/ready") as resp:
        assert resp.status == 200
    await send("/deployments/vault/predict", 200, "ana-token", json=ROWS)
    await send("/deployments/vault/predict", 200, "ana-token", json=ROWS)
    await send("/deployments/vault/predict", 401, json=ROWS)
    await send("/deployments/vault/predict", 403, "bob-token", json=ROWS)
    await send("/deployments/down/predict", 503, json=ROWS)  # refused: an upstream error
    await send("/deployments/nope/predict", 404, json=ROWS)  # unrouted

    status, text, headers = await _scrape(http, gateway)
    assert status == 200, text
    assert headers["Content-Type"] == CONTENT_TYPE
    parsed = parse(text)
    expected = {
        ("iris", "2xx"): 5,
        ("iris", "4xx"): 1,
        ("iris", "5xx"): 0,
        ("vault", "2xx"): 2,
        ("vault", "4xx"): 2,
        ("vault", "5xx"): 0,
        ("down", "2xx"): 0,
        ("down", "4xx"): 0,
        ("down", "5xx"): 1,
    }
    got = {
        (dict(labels)["deployment"], dict(labels)["status_class"]): value
        for (name, labels), value in parsed.samples.items()
        if name == REQUESTS
    }
    assert got == expected
    for deployment, count in {"iris": 6, "vault": 4, "down": 1}.items():
        assert parsed.value(f"{DURATION}_count", deployment=deployment) == count
        assert parsed.value(f"{DURATION}_bucket", deployment=deployment, le="+Inf") == count
        assert parsed.value(f"{DURATION}_sum", deployment=deployment) > 0
        assert parsed.value(IN_FLIGHT, deployment=deployment) == 0
    assert parsed.value(UPSTREAM_ERRORS, deployment="down", kind="connect") == 1
    assert parsed.value(UPSTREAM_ERRORS, deployment="iris", kind="connect") == 0
    assert parsed.value(UNROUTED) == 1
    (version,) = parsed.label_values(INFO, "version")
    assert parsed.value(INFO, version=version, gateway=gateway.gateway_id) == 1
    # Never a label a caller chooses: only these label names, and no request ids.
    assert {k for _, labels in parsed.samples for k, _ in labels} == {
        "deployment", "status_class", "le", "kind", "version", "gateway"
    }  # fmt: skip
    assert "nope" not in text

    # The METRICS stream got the same numbers, interval by interval.
    messages = await read_metrics(nats_url, gateway.gateway_id, sum(expected.values()) + 1)
    streamed: dict[tuple[str, str], int] = dict.fromkeys(expected, 0)
    for message in messages:
        for name, entry in json.loads(message.data)["deployments"].items():
            for status_class in ("2xx", "4xx", "5xx"):
                streamed[(name, status_class)] += entry[status_class]
    assert streamed == expected
    # ... and those cuts did not reset the counters Prometheus reads.
    await send("/deployments/iris/predict", 200, json=ROWS)
    after = parse((await _scrape(http, gateway))[1])
    assert after.value(REQUESTS, deployment="iris", status_class="2xx") == 6


async def test_who_sees_which_deployment(
    make_gateway: MakeGateway,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(metrics_token=SCRAPE_TOKEN)
    await publish(
        scheduler,
        gateway,
        route("iris", iris[0].address),  # team-a, public
        route("vault", iris[0].address, public=False),  # team-a, private
        route("bobs", iris[1].address, group="team-b", public=False),
    )
    async with http.post(
        f"{gateway.http_url}/deployments/vault/predict",
        json=ROWS,
        headers={"Authorization": "Bearer ana-token"},
    ) as resp:
        assert resp.status == 200

    seen: dict[str, set[str]] = {}
    for who, token in {
        "scrape": SCRAPE_TOKEN,
        "admin": "root-token",
        "ana": "ana-token",
        "bob": "bob-token",
    }.items():
        status, text, _ = await _scrape(http, gateway, token)
        assert status == 200, text
        parsed = parse(text)
        seen[who] = parsed.label_values(REQUESTS, "deployment")
        for name in SAMPLE_NAMES & {REQUESTS, IN_FLIGHT, UPSTREAM_ERRORS, f"{DURATION}_count"}:
            assert parsed.label_values(name, "deployment") == seen[who]
        if who == "bob":
            # A private deployment's name does not reach another group, in any line.
            assert "vault" not in text and '"iris"' not in text
    assert seen == {
        "scrape": {"iris", "vault", "bobs"},
        "admin": {"iris", "vault", "bobs"},
        "ana": {"iris", "vault"},
        "bob": {"bobs"},
    }

    for token in (None, "wrong-token", "sk_a_client_key"):
        status, text, headers = await _scrape(http, gateway, token)
        assert status == 401, text
        assert "WWW-Authenticate" in headers
        assert "SHIPYARD_METRICS_TOKEN" in json.loads(text)["error"]


@pytest.mark.parametrize(("mode", "expect"), [("open", 200), ("off", 404)])
async def test_metrics_endpoint_modes(
    make_gateway: MakeGateway,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
    mode: str,
    expect: int,
) -> None:
    gateway = await make_gateway(metrics_endpoint=mode)
    await publish(scheduler, gateway, route("vault", iris[0].address, public=False))
    status, text, _ = await _scrape(http, gateway, token=None)
    assert status == expect, text
    if mode == "open":
        assert parse(text).label_values(REQUESTS, "deployment") == {"vault"}


async def test_in_flight_gauge(
    make_gateway: MakeGateway,
    scheduler: FakeScheduler,
    echo_model: ModelServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    gateway = await make_gateway(metrics_endpoint="open")
    await publish(scheduler, gateway, route("echo", echo_model.address))
    gate = tmp_path / "release"
    held = asyncio.ensure_future(
        http.post(f"{gateway.http_url}/deployments/echo/predict", json={"wait_for": str(gate)})
    )
    try:
        await wait_for(lambda: gateway.handler.load.inflight("echo") == 1, message="in flight")
        parsed = parse((await _scrape(http, gateway, None))[1])
        assert parsed.value(IN_FLIGHT, deployment="echo") == 1
        assert parsed.value(REQUESTS, deployment="echo", status_class="2xx") == 0
    finally:
        gate.touch()
        response = await held
        assert response.status == 200
        response.release()
    parsed = parse((await _scrape(http, gateway, None))[1])
    assert parsed.value(IN_FLIGHT, deployment="echo") == 0
    assert parsed.value(REQUESTS, deployment="echo", status_class="2xx") == 1


# --- OpenTelemetry --------------------------------------------------------------------------


def _points(data: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


async def test_opentelemetry_export_of_the_same_counters(
    make_gateway: MakeGateway,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(metrics_endpoint="open")
    assert gateway.meter_provider is None  # no OTLP endpoint: nothing exported
    assert gateway.exposition is not None
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    export_to_opentelemetry(gateway.exposition, provider)
    try:
        await publish(
            scheduler,
            gateway,
            route("iris", iris[0].address),
            route("down", free_port_address()),
        )
        base = gateway.http_url
        for _ in range(3):
            async with http.post(f"{base}/deployments/iris/predict", json=ROWS) as resp:
                assert resp.status == 200
        async with http.post(f"{base}/deployments/iris/predict", json=[[1.0]]) as resp:
            assert resp.status == 400
        async with http.post(f"{base}/deployments/down/predict", json=ROWS) as resp:
            assert resp.status == 503
        async with http.post(f"{base}/deployments/nope/predict", json=ROWS) as resp:
            assert resp.status == 404

        points = _points(reader.get_metrics_data())
        requests = {
            (p.attributes["deployment"], p.attributes["status_class"]): p.value
            for p in points[OTEL_REQUESTS]
        }
        assert requests == {
            ("iris", "2xx"): 3,
            ("iris", "4xx"): 1,
            ("iris", "5xx"): 0,
            ("down", "2xx"): 0,
            ("down", "4xx"): 0,
            ("down", "5xx"): 1,
        }
        durations = {p.attributes["deployment"]: p for p in points[OTEL_DURATION]}
        assert durations["iris"].count == 4 and durations["down"].count == 1
        assert list(durations["iris"].explicit_bounds) == [float(le) for le in LE[:-1]]
        assert sum(durations["iris"].bucket_counts) == 4
        assert durations["iris"].sum > 0
        in_flight = {p.attributes["deployment"]: p.value for p in points[OTEL_IN_FLIGHT]}
        assert in_flight == {"iris": 0, "down": 0}
        errors = {
            (p.attributes["deployment"], p.attributes["kind"]): p.value
            for p in points[OTEL_UPSTREAM_ERRORS]
        }
        assert errors[("down", "connect")] == 1 and errors[("iris", "connect")] == 0
        assert [p.value for p in points[OTEL_UNROUTED]] == [1]

        # The same numbers as /metrics.
        parsed = parse((await _scrape(http, gateway, None))[1])
        for (deployment, status_class), value in requests.items():
            assert parsed.value(REQUESTS, deployment=deployment, status_class=status_class) == (
                value
            )
    finally:
        provider.shutdown()


class _Collector(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    async def Export(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self.requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def latest(self, metric: str) -> dict[tuple[str, ...], Any]:
        """The data points of ``metric`` in the last export that had it, by attributes."""
        for request in reversed(self.requests):
            found: dict[tuple[str, ...], Any] = {}
            for resource_metrics in request.resource_metrics:
                for scope in resource_metrics.scope_metrics:
                    for m in scope.metrics:
                        if m.name != metric:
                            continue
                        data = getattr(m, m.WhichOneof("data"))
                        for point in data.data_points:
                            key = tuple(a.value.string_value for a in point.attributes)
                            found[key] = point
            if found:
                return found
        return {}


@pytest.fixture
async def collector() -> AsyncIterator[tuple[_Collector, str]]:
    fake = _Collector()
    server = grpc.aio.server()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_otlp_export_reaches_a_collector(
    make_gateway: MakeGateway,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
    collector: tuple[_Collector, str],
) -> None:
    fake, endpoint = collector
    gateway = await make_gateway(otlp_endpoint=endpoint, otlp_metrics_interval_seconds=0.2)
    assert gateway.meter_provider is not None
    await publish(scheduler, gateway, route("iris", iris[0].address))
    for _ in range(2):
        async with http.post(f"{gateway.http_url}/deployments/iris/predict", json=ROWS) as resp:
            assert resp.status == 200

    def exported() -> bool:
        point = fake.latest(OTEL_REQUESTS).get(("iris", "2xx"))
        return point is not None and point.as_int == 2

    await wait_for(exported, timeout=15, message="the counters exported over OTLP")
    durations = fake.latest(OTEL_DURATION)
    assert durations[("iris",)].count == 2
    resource = fake.requests[-1].resource_metrics[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "gateway"

    # Stopping the gateway exports once more and ends the reader thread.
    before = len(fake.requests)
    await gateway.stop()
    assert len(fake.requests) > before
