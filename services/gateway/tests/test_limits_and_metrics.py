"""The concurrency limit (429) and the request metrics on the JetStream ``METRICS``
stream, end to end."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from shipyard_core.bus import METRICS_STREAM
from shipyard_gateway.main import GatewayHost
from shipyard_gateway.metrics import metrics_subject
from shipyard_testing import wait_for

from .conftest import FakeScheduler, MakeGateway, ModelServer, free_port_address, publish, route
from .test_gateway import ROWS


async def test_requests_past_the_limit_get_429(
    make_gateway: MakeGateway,
    scheduler: FakeScheduler,
    echo_model: ModelServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    gateway = await make_gateway(max_inflight_per_deployment=2)
    await publish(scheduler, gateway, route("echo", echo_model.address))
    url = f"{gateway.http_url}/deployments/echo/predict"
    gate = tmp_path / "release"
    # The model holds both requests until the gate file exists (one in predict(), one
    # queued behind it in the model server).
    held = [asyncio.ensure_future(http.post(url, json={"wait_for": str(gate)})) for _ in range(2)]
    try:
        await wait_for(lambda: gateway.handler.load.inflight("echo") == 2, message="2 in flight")
        async with http.post(url, json={}) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            body = await resp.json()
        assert "has 2 requests in progress at this gateway, its limit" in body["error"]
        # The OIP shape for an OIP route, too.
        async with http.post(
            f"{gateway.http_url}/v2/models/echo/infer",
            json={"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]},
        ) as resp:
            assert resp.status == 429 and "limit" in (await resp.json())["error"]
    finally:
        gate.touch()
        for response in await asyncio.gather(*held):
            assert response.status == 200
            response.release()
    # Below the limit again.
    async with http.post(url, json={}) as resp:
        assert resp.status == 200

    # The route's own limit wins over the gateway default.
    await publish(scheduler, gateway, route("echo", echo_model.address, max_inflight=1))
    gate.unlink()
    first = asyncio.ensure_future(http.post(url, json={"wait_for": str(gate)}))
    try:
        await wait_for(lambda: gateway.handler.load.inflight("echo") == 1, message="1 in flight")
        async with http.post(url, json={}) as resp:
            assert resp.status == 429
    finally:
        gate.touch()
        (await first).release()


async def read_metrics(nats_url: str, gateway_id: str, expected_requests: int) -> list[Any]:
    """The gateway's metrics messages on the METRICS stream, once they hold
    ``expected_requests`` requests in all (read with an ordered push consumer)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await wait_for(
            lambda: js.stream_info(METRICS_STREAM),
            ignore=(Exception,),
            message="METRICS stream created",
        )
        messages: list[Any] = []
        subscription = await js.subscribe(
            metrics_subject(gateway_id), stream=METRICS_STREAM, ordered_consumer=True
        )

        async def counted() -> bool:
            while True:
                try:
                    messages.append(await subscription.next_msg(timeout=0.05))
                except nats.errors.TimeoutError:
                    break
            total = sum(
                json.loads(m.data)["unrouted"]
                + sum(d["requests"] for d in json.loads(m.data)["deployments"].values())
                for m in messages
            )
            return total >= expected_requests

        await wait_for(counted, timeout=15, message="metrics of every request published")
        return messages
    finally:
        await nc.close()


async def test_metrics_reach_the_metrics_stream(
    make_gateway: MakeGateway,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
    nats_url: str,
) -> None:
    gateway = await make_gateway(metrics_interval_seconds=0.3, gateway_id="gw.test 1")
    await publish(
        scheduler,
        gateway,
        route("iris", iris[0].address),
        route("down", free_port_address()),
    )
    base = gateway.http_url
    sent = {"2xx": 0, "4xx": 0, "5xx": 0}

    async def send(method: str, path: str, expect: int, **kw: Any) -> None:
        async with http.request(method, f"{base}{path}", **kw) as resp:
            assert resp.status == expect, await resp.text()
        sent[f"{expect // 100}xx"] += 1

    for _ in range(5):
        await send("POST", "/deployments/iris/predict", 200, json=ROWS)
    infer = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": ROWS[0]}]}
    await send("POST", "/v2/models/iris/infer", 200, json=infer)
    await send("POST", "/v1/models/iris:predict", 200, json={"instances": ROWS})
    await send("POST", "/v2/models/iris/infer", 400, json={"inputs": []})
    await send("POST", "/deployments/iris/predict", 400, json=[[1.0]])
    await send("POST", "/deployment/iris/api/v1.0/predictions", 400, data=b"{")
    await send("POST", "/deployments/down/predict", 503, json=ROWS)
    async with http.post(f"{base}/deployments/nope/predict", json=ROWS) as resp:
        assert resp.status == 404  # unrouted: counted, not under a name

    total = sum(sent.values()) + 1
    messages = await read_metrics(nats_url, gateway.gateway_id, total)
    documents = [json.loads(m.data) for m in messages]

    counts = {"2xx": 0, "4xx": 0, "5xx": 0, "requests": 0, "unrouted": 0}
    protocols: dict[str, int] = {}
    buckets = 0
    for document in documents:
        counts["unrouted"] += document["unrouted"]
        for name, entry in document["deployments"].items():
            assert name in {"iris", "down"}
            for key in ("2xx", "4xx", "5xx", "requests"):
                counts[key] += entry[key]
            assert entry["requests"] == entry["2xx"] + entry["4xx"] + entry["5xx"]
            assert set(entry["latency_ms_buckets"]) == {
                "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000", "+Inf"
            }  # fmt: skip
            buckets += sum(entry["latency_ms_buckets"].values())
            assert entry["latency_ms_sum"] > 0
            for protocol, n in entry["protocols"].items():
                protocols[protocol] = protocols.get(protocol, 0) + n
    assert counts == {**sent, "requests": sum(sent.values()), "unrouted": 1}
    assert buckets == sum(sent.values())
    assert protocols == {"raw": 7, "v2": 2, "v1": 1, "seldon": 1}

    # One message per interval: consecutive, tiling time, deduplicated by id.
    assert {d["gateway"] for d in documents} == {"gw.test 1"}
    seqs = [d["seq"] for d in documents]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    for before, after in itertools.pairwise(documents):
        assert before["end"] == after["start"]
    assert messages[0].subject == "metrics.gateway.gw_test_1"
    assert messages[0].headers["Nats-Msg-Id"] == f"gw.test 1-{seqs[0]}"


@pytest.mark.parametrize("interval", [60.0])
async def test_the_last_interval_is_published_on_shutdown(
    make_gateway: MakeGateway,
    scheduler: FakeScheduler,
    iris: list[ModelServer],
    http: aiohttp.ClientSession,
    nats_url: str,
    interval: float,
) -> None:
    gateway: GatewayHost = await make_gateway(metrics_interval_seconds=interval)
    await publish(scheduler, gateway, route("iris", iris[0].address))
    async with http.post(f"{gateway.http_url}/deployments/iris/predict", json=ROWS) as resp:
        assert resp.status == 200
    # NATS must be connected before the stop, or there is nothing to publish on.
    await wait_for(lambda: gateway.metrics is not None and gateway.metrics.link.nc is not None)
    await gateway.stop()
    [message] = await read_metrics(nats_url, gateway.gateway_id, 1)
    document = json.loads(message.data)
    assert document["seq"] == 1
    assert document["deployments"]["iris"]["2xx"] == 1
