"""The gateway end to end over its own parts: real HTTP, real model servers (examples/iris),
real NATS, and a stand-in scheduler speaking the real gRPC API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import joblib
import nats
import numpy as np
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shipyard_gateway.load import LOAD_SUBJECT
from shipyard_gateway.main import GatewayHost
from shipyard_testing import wait_for
from shipyard_testing.web import serve_app

from .conftest import (
    INTERNAL_TOKEN,
    IRIS,
    FakeScheduler,
    MakeGateway,
    ModelServer,
    free_port_address,
    publish,
    route,
)

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


def removed(name: str) -> Any:
    """A RouteUpdate saying ``name`` was deleted."""
    update = route(name)
    update.removed = True
    return update


def expected_iris(rows: list[list[float]]) -> Any:
    """What the iris model answers, computed in this process."""
    model = joblib.load(IRIS / "model.joblib")
    return model.predict(np.asarray(rows)).tolist()


async def post(
    http: aiohttp.ClientSession,
    host: GatewayHost,
    deployment: str,
    payload: Any = ROWS,
    **kw: Any,
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    """POSTs a raw JSON prediction; returns status, decoded JSON body, headers."""
    if "data" not in kw:
        kw["json"] = payload
    async with http.post(f"{host.http_url}/deployments/{deployment}/predict", **kw) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


# --- routing and forwarding ---------------------------------------------------------------


async def test_predict_goes_to_a_ready_instance(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
) -> None:
    await publish(scheduler, gateway, route("iris", iris[0].address))
    status, body, headers = await post(http, gateway, "iris")
    assert status == 200
    assert body == expected_iris(ROWS)
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Request-Id"]
    # The route stream authenticated as the platform's internal service.
    assert scheduler.authorizations == [f"Bearer {INTERNAL_TOKEN}"]


async def test_model_errors_pass_through_unchanged(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
) -> None:
    await publish(scheduler, gateway, route("iris", iris[0].address))
    status, body, _ = await post(http, gateway, "iris", [[1.0, 2.0, 3.0]])
    assert status == 400
    assert body == {"error": "predict() raised ValueError: expected 4 features, got 3"}


async def test_least_outstanding_requests_spread_over_instances(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
) -> None:
    await publish(scheduler, gateway, route("iris", iris[0].address, iris[1].address))
    before = [server.served() for server in iris]
    n = 20
    results = await asyncio.gather(*(post(http, gateway, "iris") for _ in range(n)))
    assert [status for status, _, _ in results] == [200] * n

    def served() -> list[int] | None:
        counts = [server.served() - start for server, start in zip(iris, before, strict=True)]
        return counts if sum(counts) == n else None

    counts = await wait_for(served, message="access logs show every request")
    # Concurrent requests alternate between the instances (fewest in flight first).
    assert min(counts) >= n // 4, counts


async def test_unknown_deployment_is_404(gateway: GatewayHost, http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, gateway, "nope")
    assert status == 404
    assert body == {"error": "deployment 'nope' does not exist; see `shipyard deploy list`"}


async def test_stopped_deployment_is_503(
    gateway: GatewayHost, scheduler: FakeScheduler, http: aiohttp.ClientSession
) -> None:
    await publish(scheduler, gateway, route("iris", stopped=True))
    status, body, _ = await post(http, gateway, "iris")
    assert status == 503
    assert "shipyard deploy start iris" in body["error"]


async def test_private_deployment_needs_a_member(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
) -> None:
    await publish(scheduler, gateway, route("secret", iris[0].address, public=False))

    async def call(authorization: str | None) -> tuple[int, Any, Any]:
        headers = {"Authorization": authorization} if authorization else {}
        return await post(http, gateway, "secret", headers=headers)

    status, body, headers = await call(None)
    assert status == 401
    assert "private" in body["error"] and "Authorization: Bearer" in body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert (await call("Bearer wrong-token"))[0] == 401
    assert (await call("Digest abc"))[0] == 401
    # HTTP Basic carries a user token too (the user name is not checked for those).
    assert (await call("Basic YW5hOmFuYS10b2tlbg=="))[0] == 200  # ana:ana-token
    status, body, _ = await call("Bearer bob-token")
    assert status == 403
    # Who may call it, yes; which group owns it, no (that is not the caller's business).
    assert "bob" in body["error"] and "team-a" not in body["error"]
    for token in ("ana-token", "root-token"):
        status, body, _ = await call(f"Bearer {token}")
        assert (status, body) == (200, expected_iris(ROWS))


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An upstream that answers with the headers it received (and records them)."""
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        seen.append(headers)
        return web.json_response(headers, status=201)

    app = web.Application()
    app.router.add_post("/predict", handle)
    async with serve_app(app) as port:
        yield f"127.0.0.1:{port}", seen


async def test_headers_sent_upstream(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    echo: tuple[str, list[dict[str, str]]],
    http: aiohttp.ClientSession,
) -> None:
    address, _ = echo
    await publish(
        scheduler, gateway, route("open", address), route("closed", address, public=False)
    )
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    status, sent, headers = await post(
        http,
        gateway,
        "closed",
        headers={
            "Authorization": "Bearer ana-token",
            "X-Request-Id": "req-42",
            "traceparent": traceparent,
            "X-Forwarded-User": "mallory",
        },
    )
    assert status == 201  # the upstream's own status
    assert sent["x-forwarded-user"] == "ana"
    assert sent["x-request-id"] == headers["X-Request-Id"] == "req-42"
    assert sent["content-type"] == "application/json"
    # The caller's trace continues (same trace id) through the gateway.
    assert sent["traceparent"].split("-")[1] == traceparent.split("-")[1]
    assert "authorization" not in sent  # the caller's secret stays at the gateway

    # Public: no user, and a forged X-Forwarded-User is dropped; a request id is made.
    status, sent, headers = await post(
        http, gateway, "open", headers={"X-Forwarded-User": "mallory"}
    )
    assert status == 201
    assert "x-forwarded-user" not in sent
    assert sent["x-request-id"] == headers["X-Request-Id"] and len(sent["x-request-id"]) >= 16


# --- failures of model servers ------------------------------------------------------------


async def test_refused_connection_is_retried_on_another_instance(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = free_port_address()
    await publish(scheduler, gateway, route("iris", dead, iris[0].address))
    # The first request tries the dead address first (ties go round robin, in order).
    for _ in range(4):
        status, body, _ = await post(http, gateway, "iris")
        assert (status, body) == (200, expected_iris(ROWS))
    refusals = [r for r in caplog.records if f"cannot connect to {dead}" in r.getMessage()]
    # Once refused, it is passed over (unreachable_seconds) instead of tried each time.
    assert len(refusals) == 1


async def test_no_instance_accepting_connections_is_503(
    gateway: GatewayHost, scheduler: FakeScheduler, http: aiohttp.ClientSession
) -> None:
    await publish(scheduler, gateway, route("iris", free_port_address(), free_port_address()))
    status, body, _ = await post(http, gateway, "iris")
    assert status == 503
    assert "accepted a connection (2 tried)" in body["error"]


class RawUpstream:
    """A TCP server that reads a request and then hangs or hangs up, counting requests."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.address = ""
        self._server: asyncio.Server | None = None
        self._release = asyncio.Event()

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            if self.mode == "hang":
                await self._release.wait()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_upstream_timeout_is_504_and_not_retried(
    make_gateway: MakeGateway, scheduler: FakeScheduler, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(upstream_timeout_seconds=0.5)
    async with RawUpstream("hang") as one, RawUpstream("hang") as two:
        await publish(scheduler, gateway, route("slow", one.address, two.address))
        status, body, _ = await post(http, gateway, "slow")
        assert status == 504
        assert "did not answer within 0.5s" in body["error"]
        assert one.requests + two.requests == 1


async def test_upstream_hang_up_is_502_and_not_retried(
    gateway: GatewayHost, scheduler: FakeScheduler, http: aiohttp.ClientSession
) -> None:
    async with RawUpstream("close") as one, RawUpstream("close") as two:
        await publish(scheduler, gateway, route("flaky", one.address, two.address))
        status, body, _ = await post(http, gateway, "flaky")
        assert status == 502
        assert "not retried" in body["error"]
        assert one.requests + two.requests == 1


# --- scale to zero ------------------------------------------------------------------------


async def test_scaled_to_zero_is_activated_once_and_waited_for(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
) -> None:
    await publish(scheduler, gateway, route("sleepy", scaled_to_zero=True))
    waiting = [asyncio.ensure_future(post(http, gateway, "sleepy")) for _ in range(3)]
    await wait_for(lambda: scheduler.activations == ["sleepy"], message="Activate called")
    await wait_for(
        lambda: gateway.handler.load.inflight("sleepy") == 3, message="all three waiting"
    )
    assert not any(task.done() for task in waiting)
    # The scheduler starts an instance: first "starting", then ready.
    await publish(scheduler, gateway, route("sleepy"))
    await publish(scheduler, gateway, route("sleepy", iris[1].address))
    results = await asyncio.wait_for(asyncio.gather(*waiting), 30)
    assert [(status, body) for status, body, _ in results] == [(200, expected_iris(ROWS))] * 3
    assert scheduler.activations == ["sleepy"]  # single flight


async def test_waiting_request_learns_at_once_that_the_deployment_was_stopped(
    gateway: GatewayHost, scheduler: FakeScheduler, http: aiohttp.ClientSession
) -> None:
    await publish(scheduler, gateway, route("sleepy", scaled_to_zero=True))
    waiting = asyncio.ensure_future(post(http, gateway, "sleepy"))
    await wait_for(lambda: gateway.handler.load.inflight("sleepy") == 1, message="waiting")
    await publish(scheduler, gateway, route("sleepy", stopped=True))
    status, body, _ = await asyncio.wait_for(waiting, 5)  # not the 10 s activation timeout
    assert status == 503
    assert "shipyard deploy start sleepy" in body["error"]


async def test_activation_timeout_is_503(
    make_gateway: MakeGateway, scheduler: FakeScheduler, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(activation_timeout_seconds=0.5)
    await publish(scheduler, gateway, route("sleepy", scaled_to_zero=True))
    status, body, _ = await post(http, gateway, "sleepy")
    assert status == 503
    assert "no ready instance" in body["error"] and "0.5s" in body["error"]
    assert scheduler.activations == ["sleepy"]


# --- the route stream ---------------------------------------------------------------------


async def test_table_is_replaced_after_a_stream_restart(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
) -> None:
    await publish(scheduler, gateway, route("old", iris[0].address), route("kept", "x:1"))
    assert set(gateway.routes.routes()) == {"old", "kept"}
    scheduler.snapshot = [route("kept", iris[0].address), route("new", iris[1].address)]
    scheduler.end_stream()
    await wait_for(
        lambda: set(gateway.routes.routes()) == {"kept", "new"}, message="table replaced"
    )
    assert len(scheduler.authorizations) == 2
    assert (await post(http, gateway, "old"))[0] == 404
    assert (await post(http, gateway, "new"))[0] == 200
    assert (await post(http, gateway, "kept"))[0] == 200
    # The new stream carries changes as usual, removals included.
    await publish(scheduler, gateway, removed("new"))
    assert (await post(http, gateway, "new"))[0] == 404


async def test_ready_once_routes_are_synced(
    make_gateway: MakeGateway, scheduler: FakeScheduler, http: aiohttp.ClientSession
) -> None:
    scheduler.sync_gate.clear()
    gateway = await make_gateway(wait_synced=False)
    async with http.get(f"{gateway.http_url}/v2/health/live") as resp:
        assert (resp.status, await resp.json()) == (200, {"live": True})
    async with http.get(f"{gateway.http_url}/v2/health/ready") as resp:
        assert resp.status == 503
        assert (await resp.json())["ready"] is False
    scheduler.sync_gate.set()
    await asyncio.wait_for(gateway.routes.wait_synced(), 10)
    async with http.get(f"{gateway.http_url}/v2/health/ready") as resp:
        assert (resp.status, await resp.json()) == (200, {"ready": True})


async def test_grpc_health_is_serving(gateway: GatewayHost) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- the HTTP layer -----------------------------------------------------------------------


async def test_body_over_the_limit_is_413(
    make_gateway: MakeGateway,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(max_body_bytes=1024)
    await publish(scheduler, gateway, route("iris", iris[0].address))
    big = json.dumps([[5.1, 3.5, 1.4, 0.2]] * 100).encode()
    assert len(big) > 1024
    status, body, _ = await post(http, gateway, "iris", data=big)
    assert status == 413
    assert "limit of 1 KiB" in body["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 256):
            yield big[i : i + 256]

    status, body, _ = await post(http, gateway, "iris", data=chunks())
    assert status == 413
    assert "limit of 1 KiB" in body["error"]
    # Within the limit it goes through.
    assert (await post(http, gateway, "iris"))[0] == 200


async def test_errors_are_json(gateway: GatewayHost, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.http_url}/nowhere") as resp:
        assert resp.status == 404
        assert "no such endpoint" in (await resp.json())["error"]
    async with http.get(f"{gateway.http_url}/deployments/iris/predict") as resp:
        assert resp.status == 405
        assert "POST" in (await resp.json())["error"]


async def test_unexpected_error_is_500_without_details(
    gateway: GatewayHost, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("secret internals")

    gateway.handler.forward = broken  # type: ignore[method-assign]
    status, body, _ = await post(http, gateway, "iris")
    assert status == 500
    assert "secret internals" not in body["error"] and "reference" in body["error"]
    reference = body["error"].rsplit(" ", 1)[1]
    assert any(reference in record.getMessage() for record in caplog.records)


# --- load reports -------------------------------------------------------------------------


async def test_load_reports_arrive_on_nats(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
    nats_url: str,
) -> None:
    nc = await nats.connect(nats_url)
    reports: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        reports.append(json.loads(msg.data))

    try:
        await nc.subscribe(LOAD_SUBJECT, cb=collect)
        await publish(scheduler, gateway, route("iris", iris[0].address))
        for _ in range(3):
            assert (await post(http, gateway, "iris"))[0] == 200

        def counted() -> int:
            return sum(r["deployments"].get("iris", {}).get("requests", 0) for r in reports)

        await wait_for(lambda: counted() >= 3, message="3 requests reported")
        assert counted() == 3
        mine = [r for r in reports if "iris" in r["deployments"]]
        assert {r["gateway"] for r in reports} == {gateway.gateway_id}
        assert all(r["interval"] > 0 for r in reports)
        assert all(set(r["deployments"]["iris"]) == {"inflight", "peak", "requests"} for r in mine)
        assert max(r["deployments"]["iris"]["peak"] for r in mine) >= 1
    finally:
        await nc.close()
