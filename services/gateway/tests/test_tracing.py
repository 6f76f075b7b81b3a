"""One trace from the caller through the gateway to the model server: a prediction that
carries a ``traceparent`` gets a gateway span under the caller's trace, and the model
server receives a ``traceparent`` of that same trace whose parent is the gateway's span
(REST and gRPC). Spans are read from an in-memory exporter on the process's
TracerProvider (``configure_tracing``); the gateway runs in this process."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shipyard.inference.v2 import oip_pb2 as oip
from shipyard.inference.v2 import oip_pb2_grpc
from shipyard_core.telemetry import configure_tracing
from shipyard_gateway.main import GatewayHost
from shipyard_testing import wait_for

from .conftest import (
    START_TIMEOUT,
    FakeScheduler,
    MakeGateway,
    ModelServer,
    _read_ready_line,
    _start_model_server,
    _stop_model_servers,
    publish,
    route,
)

# A model that answers with the trace headers the model server received.
TRACE_SERVE = """\
def load(model_dir):
    return None


def predict(model, payload, context):
    headers = context["headers"]
    return {
        "traceparent": headers.get("traceparent", ""),
        "tracestate": headers.get("tracestate", ""),
        "request_id": headers.get("x-request-id", ""),
    }
"""


@pytest.fixture(scope="module")
def trace_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """A real model server whose model ``trace`` echoes the trace headers it got."""
    folder = tmp_path_factory.mktemp("trace-model")
    (folder / "serve.py").write_text(TRACE_SERVE)
    server = _start_model_server(folder.parent / "trace.log", folder, name="trace")
    try:
        _read_ready_line(server, time.monotonic() + START_TIMEOUT)
        yield server
    finally:
        _stop_model_servers([server])


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    configure_tracing("gateway-test", None).add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.clear()
    exporter.shutdown()  # the processor stays on the provider; a stopped exporter keeps nothing


@pytest.fixture
async def traced(
    make_gateway: MakeGateway, scheduler: FakeScheduler, trace_model: ModelServer
) -> GatewayHost:
    # Default settings: no OTLP endpoint, trace_all_requests off, so spans come only for
    # requests that carry a traceparent.
    gateway = await make_gateway()
    await publish(scheduler, gateway, route("trace", trace_model.address))
    return gateway


def _ids() -> tuple[str, str]:
    return os.urandom(16).hex(), os.urandom(8).hex()


def _of_trace(spans: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [
        span
        for span in spans.get_finished_spans()
        if span.context is not None and f"{span.context.trace_id:032x}" == trace_id
    ]


def _parts(traceparent: str) -> tuple[str, str, str, str]:
    version, trace_id, parent_id, flags = traceparent.split("-")
    return version, trace_id, parent_id, flags


async def test_rest_prediction_is_one_trace_from_caller_to_model_server(
    traced: GatewayHost, spans: InMemorySpanExporter, http: aiohttp.ClientSession
) -> None:
    trace_id, caller_span = _ids()
    headers = {
        "traceparent": f"00-{trace_id}-{caller_span}-01",
        "tracestate": "vendor=abc",
        "X-Request-Id": "req-trace-1",
    }
    async with http.post(
        f"{traced.http_url}/deployments/trace/predict", json={}, headers=headers
    ) as resp:
        assert resp.status == 200
        answer = await resp.json()

    def gateway_span() -> ReadableSpan | None:
        found = [s for s in _of_trace(spans, trace_id) if s.name == "predict trace"]
        return found[0] if found else None

    span = await wait_for(gateway_span, message="the gateway's span")
    assert span.kind == trace.SpanKind.SERVER
    assert span.parent is not None and f"{span.parent.span_id:016x}" == caller_span
    assert span.attributes is not None
    assert span.attributes["shipyard.deployment"] == "trace"
    assert span.attributes["shipyard.request_id"] == "req-trace-1"

    # The model server's hop: the same trace, the gateway's span as its parent.
    _, upstream_trace, upstream_parent, flags = _parts(answer["traceparent"])
    assert upstream_trace == trace_id
    assert upstream_parent == f"{span.context.span_id:016x}" != caller_span
    assert flags == "01"
    assert answer["tracestate"] == "vendor=abc"
    assert answer["request_id"] == "req-trace-1"


async def test_untraced_requests_get_no_span_and_no_traceparent(
    traced: GatewayHost, spans: InMemorySpanExporter, http: aiohttp.ClientSession
) -> None:
    spans.clear()
    async with http.post(f"{traced.http_url}/deployments/trace/predict", json={}) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["traceparent"] == ""
    assert [s for s in spans.get_finished_spans() if s.name == "predict trace"] == []


@pytest.fixture
async def stub(traced: GatewayHost) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(traced.address) as channel:
        yield oip_pb2_grpc.GRPCInferenceServiceStub(channel)


async def _grpc_predict(stub: Any, trace_id: str, caller_span: str) -> str:
    """A gRPC ModelInfer carrying a traceparent; the traceparent the model server got."""
    request = oip.ModelInferRequest(model_name="trace")
    request.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")
    response = await stub.ModelInfer(
        request, metadata=(("traceparent", f"00-{trace_id}-{caller_span}-01"),), timeout=10
    )
    outputs = {output.name: output for output in response.outputs}
    return str(outputs["traceparent"].contents.bytes_contents[0].decode())


async def test_grpc_call_span_joins_the_callers_trace(
    traced: GatewayHost, spans: InMemorySpanExporter, stub: Any
) -> None:
    trace_id, caller_span = _ids()
    await _grpc_predict(stub, trace_id, caller_span)

    def rpc_span() -> ReadableSpan | None:
        found = [s for s in _of_trace(spans, trace_id) if s.name.endswith("/ModelInfer")]
        return found[0] if found else None

    rpc = await wait_for(rpc_span, message="the gRPC call's span")
    assert rpc.kind == trace.SpanKind.SERVER
    assert rpc.parent is not None and f"{rpc.parent.span_id:016x}" == caller_span


async def test_grpc_prediction_reaches_the_model_server_in_the_same_trace(
    traced: GatewayHost, spans: InMemorySpanExporter, stub: Any
) -> None:
    trace_id, caller_span = _ids()
    received = await _grpc_predict(stub, trace_id, caller_span)
    _, upstream_trace, upstream_parent, _ = _parts(received or "---")
    assert upstream_trace == trace_id

    def predict_span() -> ReadableSpan | None:
        found = [s for s in _of_trace(spans, trace_id) if s.name == "predict trace"]
        return found[0] if found else None

    predict = await wait_for(predict_span, timeout=2, message="the gateway's prediction span")
    assert upstream_parent == f"{predict.context.span_id:016x}"
