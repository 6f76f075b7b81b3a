"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``) end to end:
contents and raw tensors, metadata, readiness, access through metadata, status codes."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from shipyard.inference.v2 import oip_pb2 as oip
from shipyard.inference.v2 import oip_pb2_grpc
from shipyard_gateway.main import GatewayHost
from shipyard_testing import wait_for

from .conftest import FakeKeys, FakeScheduler, MakeGateway, ModelServer, publish, route
from .test_gateway import ROWS, RawUpstream, expected_iris

FLAT = [value for row in ROWS for value in row]


@pytest.fixture
async def stub(gateway: GatewayHost) -> AsyncIterator[Any]:
    """A client of the gateway's OIP gRPC service."""
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield oip_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
async def served(
    gateway: GatewayHost, scheduler: FakeScheduler, iris: list[ModelServer]
) -> GatewayHost:
    """The gateway routing ``iris`` (revision 2) to an iris model server."""
    await publish(scheduler, gateway, route("iris", iris[0].address, revision=2))
    return gateway


def infer_request(**kw: Any) -> oip.ModelInferRequest:
    """An iris request: three rows of FP64 contents, unless ``kw`` says otherwise."""
    request = oip.ModelInferRequest(model_name=kw.pop("model_name", "iris"), id="grpc-1", **kw)
    if not request.inputs:
        tensor = request.inputs.add(name="input-0", datatype="FP64", shape=[3, 4])
        tensor.contents.fp64_contents.extend(FLAT)
    return request


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and details a call failed with."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return failure.value.code(), failure.value.details() or ""


def names(response: oip.ModelInferResponse) -> list[str]:
    """The class names of an iris answer."""
    [output] = response.outputs
    assert (output.datatype, list(output.shape)) == ("BYTES", [3])
    return [value.decode() for value in output.contents.bytes_contents]


async def test_model_infer_with_contents(served: GatewayHost, stub: Any) -> None:
    response = await stub.ModelInfer(infer_request(), timeout=10)
    assert (response.model_name, response.id) == ("iris", "grpc-1")
    assert names(response) == expected_iris(ROWS)
    # The active revision as the version works too.
    response = await stub.ModelInfer(infer_request(model_version="2"), timeout=10)
    assert names(response) == expected_iris(ROWS)


@pytest.mark.parametrize(("datatype", "code"), [("FP32", "f"), ("FP64", "d"), ("FP16", "e")])
async def test_model_infer_with_raw_contents(
    served: GatewayHost, stub: Any, datatype: str, code: str
) -> None:
    request = oip.ModelInferRequest(model_name="iris")
    request.inputs.add(name="input-0", datatype=datatype, shape=[3, 4])
    request.raw_input_contents.append(struct.pack(f"<{len(FLAT)}{code}", *FLAT))
    response = await stub.ModelInfer(request, timeout=10)
    assert names(response) == expected_iris(ROWS)


async def test_bad_tensors_are_invalid_argument(served: GatewayHost, stub: Any) -> None:
    wrong_count = oip.ModelInferRequest(model_name="iris")
    wrong_count.inputs.add(name="x", datatype="FP64", shape=[1, 4]).contents.fp64_contents.extend(
        FLAT
    )
    wrong_field = oip.ModelInferRequest(model_name="iris")
    wrong_field.inputs.add(name="x", datatype="FP64", shape=[3, 4]).contents.fp32_contents.extend(
        FLAT
    )
    unknown_type = oip.ModelInferRequest(model_name="iris")
    unknown_type.inputs.add(name="x", datatype="FLOAT", shape=[1])
    raw_size = oip.ModelInferRequest(model_name="iris")
    raw_size.inputs.add(name="x", datatype="FP32", shape=[3, 4])
    raw_size.raw_input_contents.append(b"\0" * 7)
    raw_count = oip.ModelInferRequest(model_name="iris")
    raw_count.inputs.add(name="x", datatype="FP32", shape=[1])
    raw_count.inputs.add(name="y", datatype="FP32", shape=[1])
    raw_count.raw_input_contents.append(b"\0" * 4)
    cases = [
        (wrong_count, "has 12 values but inputs[0].shape [1, 4] needs 4"),
        (wrong_field, "takes its values from fp64_contents"),
        (unknown_type, "'FLOAT' is not an OIP datatype"),
        (raw_size, "has 7 bytes but 12 FP32 values need 48"),
        (raw_count, "raw_input_contents has 1 entries for 2 inputs"),
        (oip.ModelInferRequest(model_name="iris"), "no inputs"),
    ]
    for request, message in cases:
        code, details = await code_of(stub.ModelInfer(request, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert message in details, details
    # The model's own refusal (3 features) comes back with its message.
    short = oip.ModelInferRequest(model_name="iris")
    short.inputs.add(name="x", datatype="FP64", shape=[1, 3]).contents.fp64_contents.extend(
        [1.0, 2.0, 3.0]
    )
    code, details = await code_of(stub.ModelInfer(short, timeout=10))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "predict() raised ValueError: expected 4 features, got 3",
    )


async def test_metadata_readiness_and_server_calls(
    served: GatewayHost, scheduler: FakeScheduler, stub: Any
) -> None:
    metadata = await stub.ModelMetadata(oip.ModelMetadataRequest(name="iris"), timeout=10)
    assert (metadata.name, list(metadata.versions), metadata.platform) == (
        "iris",
        ["2"],
        "shipyard",
    )
    ready = await stub.ModelReady(oip.ModelReadyRequest(name="iris"), timeout=10)
    assert ready.ready
    await publish(scheduler, served, route("sleepy", scaled_to_zero=True))
    ready = await stub.ModelReady(oip.ModelReadyRequest(name="sleepy"), timeout=10)
    assert not ready.ready
    await wait_for(lambda: scheduler.activations == ["sleepy"], message="woken")

    assert (await stub.ServerLive(oip.ServerLiveRequest(), timeout=10)).live
    assert (await stub.ServerReady(oip.ServerReadyRequest(), timeout=10)).ready
    server = await stub.ServerMetadata(oip.ServerMetadataRequest(), timeout=10)
    assert (server.name, list(server.extensions)) == ("shipyard", [])
    assert server.version

    code, details = await code_of(stub.ModelMetadata(oip.ModelMetadataRequest(name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "'nope' does not exist" in details
    code, _ = await code_of(stub.ModelReady(oip.ModelReadyRequest(name="iris", version="9")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await code_of(stub.ModelInfer(infer_request(model_name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_access_through_metadata(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    keys: FakeKeys,
    echo_model: ModelServer,
    stub: Any,
) -> None:
    keys.add("sk_grpc", "echo", "batch-job")
    await publish(scheduler, gateway, route("echo", echo_model.address, public=False))
    request = oip.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")

    async def user(metadata: tuple[tuple[str, str], ...]) -> str:
        response = await stub.ModelInfer(request, metadata=metadata, timeout=10)
        outputs = {output.name: output for output in response.outputs}
        return outputs["user"].contents.bytes_contents[0].decode()

    assert await user((("x-api-key", "sk_grpc"),)) == "batch-job"
    assert await user((("authorization", "Bearer sk_grpc"),)) == "batch-job"
    assert await user((("authorization", "Bearer ana-token"),)) == "ana"

    code, details = await code_of(stub.ModelInfer(request, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "is private" in details
    code, _ = await code_of(
        stub.ModelInfer(request, metadata=(("x-api-key", "sk_wrong"),), timeout=10)
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = await code_of(
        stub.ModelInfer(request, metadata=(("authorization", "Bearer bob-token"),), timeout=10)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # The access check comes before the tensors are read: no leak to strangers.
    empty = oip.ModelInferRequest(model_name="echo")
    code, _ = await code_of(stub.ModelInfer(empty, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_unavailable_and_deadline(
    make_gateway: MakeGateway, scheduler: FakeScheduler
) -> None:
    gateway = await make_gateway(upstream_timeout_seconds=0.5)
    async with (
        RawUpstream("hang") as hanging,
        grpc.aio.insecure_channel(gateway.address) as channel,
    ):
        stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        await publish(
            scheduler,
            gateway,
            route("iris", hanging.address),
            route("stopped", stopped=True),
        )
        code, details = await code_of(stub.ModelInfer(infer_request(), timeout=10))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "within 0.5s" in details
        code, details = await code_of(
            stub.ModelInfer(infer_request(model_name="stopped"), timeout=10)
        )
        assert code == grpc.StatusCode.UNAVAILABLE and "is stopped" in details


async def test_concurrency_limit_is_shared_by_rest_and_grpc(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    echo_model: ModelServer,
    stub: Any,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "release"
    await publish(scheduler, gateway, route("echo", echo_model.address, max_inflight=1))
    held = asyncio.ensure_future(
        http.post(f"{gateway.http_url}/deployments/echo/predict", json={"wait_for": str(gate)})
    )
    try:
        await wait_for(lambda: gateway.handler.load.inflight("echo") == 1, message="in flight")
        request = oip.ModelInferRequest(model_name="echo")
        request.inputs.add(name="x", datatype="INT64", shape=[1]).contents.int64_contents.append(1)
        code, details = await code_of(stub.ModelInfer(request, timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in details
    finally:
        gate.touch()
        response = await held
        assert response.status == 200
        response.release()
