"""The gateway's parts on their own: routing table, load tracker, error table, settings,
envelope checks, credentials, metrics aggregation and publishing, gRPC tensor
translation, the client key cache."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from shipyard.inference.v2 import oip_pb2 as oip
from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard_core.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from shipyard_gateway.access import Credentials, credentials_from_headers
from shipyard_gateway.errors import (
    BadGateway,
    BadRequest,
    DeploymentStopped,
    ModelFailed,
    PayloadTooLarge,
    TooManyRequests,
    UpstreamTimeout,
    error_for_upstream_status,
    grpc_status_for_exception,
    http_status_for_exception,
)
from shipyard_gateway.keys import ClientKeyVerifier
from shipyard_gateway.load import LoadTracker
from shipyard_gateway.metrics import MetricsPublisher, MetricsRecorder, metrics_subject
from shipyard_gateway.oip_grpc import infer_request_json, infer_response_from_json
from shipyard_gateway.protocols import check_kserve_v1, check_oip, check_seldon, error_body
from shipyard_gateway.routing import Access, Route, RoutingTable
from shipyard_gateway.settings import GatewaySettings
from shipyard_testing import wait_for

from .conftest import FakeKeys


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


def test_an_async_batch_is_load_but_not_against_the_callers_limit() -> None:
    tracker = LoadTracker()
    with tracker.track_batch("iris", 40), tracker.track("iris"):
        assert tracker.inflight("iris") == 1  # what the concurrency limit sees
        assert tracker.take_report() == {"iris": {"inflight": 41, "peak": 41, "requests": 41}}
    assert tracker.take_report() == {"iris": {"inflight": 0, "peak": 41, "requests": 0}}


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


# --- the error table -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "http", "code"),
    [
        (BadRequest("x"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("x"), 404, grpc.StatusCode.NOT_FOUND),
        (Unauthenticated("x"), 401, grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied("x"), 403, grpc.StatusCode.PERMISSION_DENIED),
        (TooManyRequests("x"), 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (PayloadTooLarge("x"), 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeploymentStopped("iris"), 503, grpc.StatusCode.UNAVAILABLE),
        (UpstreamTimeout("x"), 504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (ModelFailed("x"), 500, grpc.StatusCode.INTERNAL),
    ],
)
def test_one_table_for_http_and_grpc(error: Exception, http: int, code: grpc.StatusCode) -> None:
    # Domain errors keep their message in both transports.
    assert http_status_for_exception(error) == (http, str(error))
    assert grpc_status_for_exception(error) == (code, http, str(error))


def test_upstream_statuses_read_the_table_backwards() -> None:
    for status, cls in [
        (400, InvalidArgument),
        (404, NotFound),
        (413, PayloadTooLarge),
        (418, BadRequest),
        (500, ModelFailed),
        (503, Unavailable),
        (504, UpstreamTimeout),
        (599, ModelFailed),
    ]:
        error = error_for_upstream_status(status, "the model said so")
        assert isinstance(error, cls), status
        assert error.message == "the model said so"
    code, http, message = grpc_status_for_exception(RuntimeError("secret"))
    assert (code, http) == (grpc.StatusCode.INTERNAL, 500) and "secret" not in message


# --- envelope checks -----------------------------------------------------------------------


def _oip(**tensor: Any) -> bytes:
    base = {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}
    return json.dumps({"inputs": [{**base, **tensor}]}).encode()


def test_oip_envelope() -> None:
    check_oip(_oip())
    check_oip(_oip(data=[[1, 2], [3, 4]]))
    check_oip(_oip(shape=[], data=[7]))  # a scalar
    check_oip(_oip(shape=[0, 3], data=[]))
    bad = [
        (_oip(data=[1, 2, 3]), "has 3 values but inputs[0].shape [2, 2] needs 4"),
        (_oip(data=[[1, 2], [3]]), "has 3 values"),
        (_oip(shape=[2, -2]), "non-negative integers"),
        (_oip(shape=[True, 4]), "non-negative integers"),
        (_oip(datatype="F32"), "'F32' is not an OIP datatype"),
        (_oip(name=""), "name is missing"),
        (_oip(data=None), "data is missing"),
        (_oip(data={"a": 1}), "data must be a list"),
        (b'{"inputs": "x"}', "must be a non-empty list"),
        (b"{}", '"inputs" is missing'),
        (b"[]", "must be a JSON object"),
        (b"", "empty"),
        (b"\xff", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),  # deeper than the decoder allows
        (json.dumps({"inputs": [1]}).encode(), "must be an object"),
    ]
    for body, message in bad:
        with pytest.raises(BadRequest, match=re.escape(message)):
            check_oip(body)
    deep: Any = [1.0]
    for _ in range(900):  # nested near the decoder's limit: counted without recursion
        deep = [deep]
    with pytest.raises(BadRequest, match="has 1 values"):
        check_oip(_oip(data=deep))
    with pytest.raises(BadRequest, match='"parameters" must be an object'):
        check_oip(json.dumps({**json.loads(_oip()), "parameters": []}).encode())
    with pytest.raises(BadRequest, match='"outputs" must be a list'):
        check_oip(json.dumps({**json.loads(_oip()), "outputs": ["y"]}).encode())
    check_oip(b"\xef\xbb\xbf" + _oip())  # a UTF-8 BOM is forgiven, as by the model server


def test_kserve_and_seldon_envelopes() -> None:
    check_kserve_v1(b'{"instances": []}')
    for body in (b'{"inputs": []}', b"[]", b'{"instances": 1}'):
        with pytest.raises(BadRequest):
            check_kserve_v1(body)
    check_seldon(b'{"data": {"ndarray": [[1, 2]]}}')
    check_seldon(b'{"data": {"tensor": {"shape": [1, 2], "values": [1, 2]}}}')
    check_seldon(b'{"jsonData": {"a": 1}}')
    for body, message in [
        (b'{"data": {"tensor": {"shape": [2, 2], "values": [1]}}}', "has 1 values"),
        (b'{"data": {"tensor": {"shape": [2]}}}', 'needs "shape" and "values"'),
        (b'{"data": {"names": ["a"]}}', 'needs "ndarray" or "tensor"'),
        (b'{"data": [1]}', "must be an object"),
        (b'{"ndarray": [1]}', '"data" is missing'),
    ]:
        with pytest.raises(BadRequest, match=re.escape(message)):
            check_seldon(body)


def test_error_bodies_by_protocol() -> None:
    assert json.loads(error_body("v2", 404, "gone")) == {"error": "gone"}
    assert json.loads(error_body("seldon", 429, "slow down")) == {
        "status": {
            "code": 429,
            "info": "slow down",
            "reason": "TOO_MANY_REQUESTS",
            "status": "FAILURE",
        }
    }


# --- credentials ---------------------------------------------------------------------------


def test_credentials_from_headers() -> None:
    basic = "Basic " + base64.b64encode(b"mobile:sk_abc").decode()
    assert credentials_from_headers({"authorization": basic}) == Credentials(
        "basic", "sk_abc", "mobile"
    )
    assert credentials_from_headers({"authorization": "bearer  sk_abc "}) == Credentials(
        "bearer", "sk_abc"
    )
    assert credentials_from_headers({"x-api-key": "sk_abc"}) == Credentials("api-key", "sk_abc")
    # Authorization wins over X-API-Key; nothing at all is None.
    found = credentials_from_headers({"authorization": "Bearer t", "x-api-key": "k"})
    assert found is not None and found.secret == "t"
    assert credentials_from_headers({}) is None
    assert credentials_from_headers({"authorization": "Bearer sk_1"}).is_client_key  # type: ignore[union-attr]
    for value in (
        "Bearer",
        "Token x",
        "Basic !!!",
        "Basic " + base64.b64encode(b"nocolon").decode(),
    ):
        with pytest.raises(Unauthenticated):
            credentials_from_headers({"authorization": value})
    assert "sk_abc" not in repr(Credentials("basic", "sk_abc", "mobile"))


# --- metrics -------------------------------------------------------------------------------


def test_metrics_recorder() -> None:
    recorder = MetricsRecorder(known={"iris"}.__contains__)
    recorder.record("iris", 200, 0.004, "v2")  # 4 ms: the 5 ms bucket
    recorder.record("iris", 200, 0.005, "v2")  # 5 ms: still the 5 ms bucket (upper bound)
    recorder.record("iris", 404, 0.030, "raw")
    recorder.record("iris", 503, 12.0, "grpc")  # above 10 s: +Inf
    recorder.record("iris", 302, 0.001, "raw")  # below 400 counts as 2xx
    recorder.record("nope", 404, 0.001, "raw")
    deployments, unrouted = recorder.take()
    assert unrouted == 1
    iris = deployments["iris"]
    assert (iris["requests"], iris["2xx"], iris["4xx"], iris["5xx"]) == (5, 3, 1, 1)
    assert iris["latency_ms_buckets"]["5"] == 3
    assert iris["latency_ms_buckets"]["50"] == 1
    assert iris["latency_ms_buckets"]["+Inf"] == 1
    assert sum(iris["latency_ms_buckets"].values()) == 5
    assert iris["latency_ms_sum"] == pytest.approx(4 + 5 + 30 + 12000 + 1)
    assert iris["protocols"] == {"v2": 2, "raw": 2, "grpc": 1}
    assert recorder.take() == ({}, 0)  # a new interval starts empty
    assert metrics_subject("host.a b*>") == "metrics.gateway.host_a_b__"


class _FlakyJetStream:
    def __init__(self) -> None:
        self.fail = True
        self.published: list[tuple[str, bytes, str]] = []
        self.attempts: list[str] = []

    async def stream_info(self, name: str) -> Any:
        # Shaped like nats-py's StreamInfo as far as ensure_streams reads it.
        return SimpleNamespace(config=SimpleNamespace(max_age=3600.0))

    async def update_stream(self, config: Any) -> Any:
        return object()

    async def publish(
        self,
        subject: str,
        payload: bytes,
        timeout: float,  # noqa: ASYNC109 - nats-py's signature
        headers: dict[str, str],
    ) -> None:
        self.attempts.append(headers["Nats-Msg-Id"])
        if self.fail:
            raise TimeoutError("no ack")
        self.published.append((subject, payload, headers["Nats-Msg-Id"]))


class _FakeConnection:
    def __init__(self, js: _FlakyJetStream) -> None:
        self.js = js

    def jetstream(self, timeout: float) -> _FlakyJetStream:
        return self.js


class _FakeLink:
    def __init__(self, js: _FlakyJetStream) -> None:
        self.nc: Any = _FakeConnection(js)


async def test_failed_publishes_are_kept_and_retried_with_their_ids() -> None:
    js = _FlakyJetStream()
    recorder = MetricsRecorder()
    clock = [1_700_000_000.0]
    publisher = MetricsPublisher(
        recorder,
        _FakeLink(js),  # type: ignore[arg-type]
        gateway_id="gw",
        interval=10,
        max_pending=3,
        wall_clock=lambda: clock[0],
    )
    recorder.record("iris", 200, 0.001, "raw")
    clock[0] += 10
    await publisher.publish()  # fails: kept
    assert (publisher.pending, js.attempts) == (1, ["gw-1"])
    recorder.record("iris", 500, 0.001, "raw")
    clock[0] += 10
    await publisher.publish()  # the first one again (same id), then stops
    assert (publisher.pending, js.attempts) == (2, ["gw-1", "gw-1"])
    js.fail = False
    clock[0] += 10
    await publisher.publish()
    assert publisher.pending == 0
    assert [msg_id for _, _, msg_id in js.published] == ["gw-1", "gw-2", "gw-3"]
    documents = [json.loads(body) for _, body, _ in js.published]
    assert [d["deployments"].get("iris", {}).get("requests", 0) for d in documents] == [1, 1, 0]
    assert documents[0]["start"] == "2023-11-14T22:13:20.000Z"
    assert documents[0]["end"] == documents[1]["start"]
    assert {subject for subject, _, _ in js.published} == {"metrics.gateway.gw"}

    # Bounded: beyond max_pending the oldest interval goes, and is accounted for.
    js.fail = True
    for _ in range(5):
        recorder.record("iris", 200, 0.001, "raw")
        await publisher.publish()
    assert publisher.pending == 3
    assert publisher.dropped_requests == 2


# --- gRPC tensors ---------------------------------------------------------------------------


def _raw_request(datatype: str, shape: list[int], raw: bytes) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _data(body: bytes) -> Any:
    return json.loads(body)["inputs"][0]["data"]


@pytest.mark.parametrize(
    ("datatype", "code", "values"),
    [
        ("BOOL", "?", [True, False, True]),
        ("INT8", "b", [-128, 0, 127]),
        ("INT16", "h", [-32768, 1, 32767]),
        ("INT32", "i", [-(2**31), 2, 2**31 - 1]),
        ("INT64", "q", [-(2**63), 3, 2**63 - 1]),
        ("UINT8", "B", [0, 1, 255]),
        ("UINT16", "H", [0, 2, 65535]),
        ("UINT32", "I", [0, 3, 2**32 - 1]),
        ("UINT64", "Q", [0, 4, 2**64 - 1]),
        ("FP16", "e", [0.5, -2.0, 1024.0]),
        ("FP32", "f", [0.5, -2.25, 3.0]),
        ("FP64", "d", [0.1, -2.5, 1e300]),
    ],
)
def test_raw_contents_are_little_endian(datatype: str, code: str, values: list[Any]) -> None:
    raw = struct.pack(f"<{len(values)}{code}", *values)
    assert _data(infer_request_json(_raw_request(datatype, [3], raw))) == values


def test_raw_bf16_and_bytes() -> None:
    # bfloat16 = the upper two bytes of a float32.
    floats = [1.0, -2.5, 0.15625]
    raw = b"".join(struct.pack("<f", value)[2:] for value in floats)
    assert _data(infer_request_json(_raw_request("BF16", [3], raw))) == floats
    items = [b"hello", b"", "h\u00e9".encode()]
    raw = b"".join(len(item).to_bytes(4, "little") + item for item in items)
    assert _data(infer_request_json(_raw_request("BYTES", [3], raw))) == ["hello", "", "h\u00e9"]
    for bad in (raw[:-1], raw + b"\0", b"\xff\xff\xff\x7f"):
        with pytest.raises(BadRequest):
            infer_request_json(_raw_request("BYTES", [3], bad))
    with pytest.raises(BadRequest, match="not UTF-8"):
        infer_request_json(_raw_request("BYTES", [1], b"\1\0\0\0\xff"))


def test_contents_parameters_and_outputs_become_json() -> None:
    request = oip.ModelInferRequest(model_name="m", id="r1")
    tensor = request.inputs.add(name="a", datatype="INT32", shape=[2, 2])
    tensor.contents.int_contents.extend([1, 2, 3, 4])
    tensor.parameters["content_type"].string_param = "np"
    request.inputs.add(name="b", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"t")
    request.parameters["n"].int64_param = 3
    request.parameters["flag"].bool_param = True
    request.outputs.add(name="y")
    document = json.loads(infer_request_json(request))
    assert document == {
        "id": "r1",
        "inputs": [
            {
                "name": "a",
                "shape": [2, 2],
                "datatype": "INT32",
                "data": [1, 2, 3, 4],
                "parameters": {"content_type": "np"},
            },
            {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["t"]},
        ],
        "parameters": {"n": 3, "flag": True},
        "outputs": [{"name": "y"}],
    }
    mixed = _raw_request("FP32", [1], b"\0\0\0\0")
    mixed.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(BadRequest, match="one or the other"):
        infer_request_json(mixed)


def test_json_answers_become_contents() -> None:
    body = json.dumps(
        {
            "model_name": "m",
            "id": "r1",
            "outputs": [
                {
                    "name": "p",
                    "shape": [2, 2],
                    "datatype": "FP64",
                    "data": [[0.1, 0.2], [0.3, 0.4]],
                },
                {"name": "c", "shape": [2], "datatype": "INT64", "data": [1, 2]},
                {"name": "b", "shape": [1], "datatype": "BOOL", "data": [True]},
                {
                    "name": "j",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"content_type": "json"},
                    "data": ['{"a":1}'],
                },
            ],
        }
    ).encode()
    response = infer_response_from_json(body, "m")
    by_name = {output.name: output for output in response.outputs}
    assert list(by_name["p"].contents.fp64_contents) == [0.1, 0.2, 0.3, 0.4]
    assert list(by_name["p"].shape) == [2, 2]
    assert list(by_name["c"].contents.int64_contents) == [1, 2]
    assert list(by_name["b"].contents.bool_contents) == [True]
    assert list(by_name["j"].contents.bytes_contents) == [b'{"a":1}']
    assert by_name["j"].parameters["content_type"].string_param == "json"
    # Non-finite numbers arrive as null (JSON has no NaN) and become NaN again.
    nan = infer_response_from_json(
        b'{"outputs": [{"name": "p", "shape": [2], "datatype": "FP32", "data": [null, 1.5]}]}',
        "m",
    )
    values = list(nan.outputs[0].contents.fp32_contents)
    assert values[1] == 1.5 and values[0] != values[0]
    for broken in (
        b"nope",
        b"[]",
        b'{"outputs": [{"name": "x"}]}',
        b'{"outputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [null]}]}',
    ):
        with pytest.raises(BadGateway):
            infer_response_from_json(broken, "m")


# --- the client key cache -------------------------------------------------------------------


async def test_client_key_cache_holds_answers_at_most_its_ttl(keys: FakeKeys) -> None:
    now = [100.0]
    verifier = ClientKeyVerifier(keys.address, "internal", ttl_seconds=1.0, clock=lambda: now[0])
    keys.add("sk_1", "iris", "mobile")
    try:
        caller = await verifier.verify("iris", "sk_1", group="team-a")
        assert (caller.user, caller.token_id, caller.groups) == (
            "mobile",
            "ck_mobile",
            frozenset({"team-a"}),
        )
        await verifier.verify("iris", "sk_1", group="team-a")
        assert len(keys.calls) == 1  # cached
        now[0] += 1.0  # the TTL is over: asked again, and the revocation is seen
        keys.keys["sk_1"].revoked = True
        with pytest.raises(Unauthenticated, match="revoked"):
            await verifier.verify("iris", "sk_1", group="team-a")
        with pytest.raises(Unauthenticated):
            await verifier.verify("iris", "sk_1", group="team-a")
        assert len(keys.calls) == 3  # refusals are not cached
        assert keys.authorizations[0] == "Bearer internal"
    finally:
        await verifier.close()
