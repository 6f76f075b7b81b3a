"""The gRPC kit against a real grpc.aio server on a free port.

A generic handler with JSON (de)serializers stands in for a generated service, so these
tests need no proto; the identity stub is used where a generated service is the point.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shipyard.keys.v1 import identity_pb2, identity_pb2_grpc
from shipyard_core import errors
from shipyard_core.auth import (
    Principal,
    RemoteAuthenticator,
    current_principal,
    optional_principal,
)
from shipyard_core.grpckit import (
    INTERNAL_MESSAGE,
    MISSING_TOKEN_MESSAGE,
    ServiceHost,
    TracingClientInterceptor,
    bearer_metadata,
    error_from_rpc,
)
from shipyard_core.metadata import correlation_id_var
from shipyard_core.settings import CommonSettings
from shipyard_core.telemetry import configure_tracing, current_trace_ids

SERVICE = "test.v1.Echo"
ALICE = Principal(user="alice", admin=False, groups=frozenset({"team-a"}), token_id="t-1")
ROOT = Principal(user="root", admin=True, groups=frozenset(), token_id="t-0")


class KitSettings(CommonSettings):
    service_name: str = "kit-test"
    grpc_port: int = 0
    shutdown_grace_seconds: float = 5.0


class FakeAuthenticator:
    """Knows two tokens; counts lookups."""

    def __init__(self) -> None:
        self.tokens = {"alice-token": ALICE, "root-token": ROOT}
        self.calls = 0

    async def authenticate(self, token: str) -> Principal:
        self.calls += 1
        try:
            return self.tokens[token]
        except KeyError:
            raise errors.Unauthenticated("unknown or revoked token") from None


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


# The domain errors a handler raises, by name, with the status each must arrive as.
DOMAIN_ERRORS: dict[str, tuple[errors.ShipyardError, grpc.StatusCode]] = {
    "InvalidArgument": (
        errors.InvalidArgument("replicas", "must be at least 1", "pass --replicas 1 or more"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "NotFound": (errors.NotFound("deployment iris-prod not found"), grpc.StatusCode.NOT_FOUND),
    "AlreadyExists": (errors.AlreadyExists("image iris:1 exists"), grpc.StatusCode.ALREADY_EXISTS),
    "FailedPrecondition": (
        errors.FailedPrecondition("image iris:1 is used by iris-prod"),
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    "ResourceExhausted": (
        errors.ResourceExhausted("needs 4 cpu, team-a has 2 free"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    "PermissionDenied": (
        errors.PermissionDenied("admin only: x"),
        grpc.StatusCode.PERMISSION_DENIED,
    ),
    "Unauthenticated": (errors.Unauthenticated("token expired"), grpc.StatusCode.UNAUTHENTICATED),
    "Unavailable": (errors.Unavailable("quota service unavailable"), grpc.StatusCode.UNAVAILABLE),
    "ConcurrencyError": (errors.ConcurrencyError("deployment-7", 3), grpc.StatusCode.ABORTED),
}


async def who_am_i(request: Any, context: Any) -> Any:
    principal = current_principal()
    ids = current_trace_ids()
    return {
        "user": principal.user,
        "admin": principal.admin,
        "groups": sorted(principal.groups),
        "trace_id": ids[0] if ids else None,
        "correlation_id": correlation_id_var.get(),
    }


async def fail(request: Any, context: Any) -> Any:
    if request["kind"] == "bug":
        raise RuntimeError("connection to postgres://admin:hunter2@db failed")
    raise DOMAIN_ERRORS[request["kind"]][0]


async def public(request: Any, context: Any) -> Any:
    return {"anonymous": optional_principal() is None}


async def count(request: Any, context: Any) -> AsyncIterator[Any]:
    user = current_principal().user
    for i in range(request["n"]):
        yield {"i": i, "user": user}
    if request.get("then_fail"):
        raise errors.NotFound("ran out of things")


def echo_handler() -> grpc.GenericRpcHandler:
    def unary(fn: Callable[..., Any]) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=json.loads, response_serializer=_dumps
        )

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "WhoAmI": unary(who_am_i),
            "Fail": unary(fail),
            "Public": unary(public),
            "Count": grpc.unary_stream_rpc_method_handler(
                count, request_deserializer=json.loads, response_serializer=_dumps
            ),
        },
    )


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = configure_tracing("kit-test", None)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture(scope="module")
def authenticator() -> FakeAuthenticator:
    return FakeAuthenticator()


@pytest.fixture(scope="module")
async def host(
    spans: InMemorySpanExporter, authenticator: FakeAuthenticator
) -> AsyncIterator[ServiceHost]:
    service_host = ServiceHost(
        KitSettings(), authenticator=authenticator, public_methods=[f"/{SERVICE}/Public"]
    )
    assert service_host.add_generic_handler(echo_handler()) == SERVICE
    async with service_host:
        yield service_host


@pytest.fixture(scope="module")
async def channel(host: ServiceHost) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(
        host.address, interceptors=[TracingClientInterceptor()]
    ) as chan:
        yield chan


def unary(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{name}", request_serializer=_dumps, response_deserializer=json.loads
    )


ALICE_MD = bearer_metadata("alice-token")


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Polls ``condition`` until it holds; fails after ``seconds``."""
    async with asyncio.timeout(seconds):
        # Spans end from grpc callbacks, which offer nothing to await: poll, with a deadline.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# --- health and reflection ----------------------------------------------------------------


async def test_bound_port_is_reported(host: ServiceHost) -> None:
    assert host.port > 0
    assert host.address.endswith(f":{host.port}")


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_health_check_answers_serving(channel: grpc.aio.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for answer in stub.ServerReflectionInfo(iter([request]), timeout=5):
        names |= {s.name for s in answer.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOMAIN_ERRORS))
async def test_domain_error_arrives_as_its_status(channel: grpc.aio.Channel, kind: str) -> None:
    error, code = DOMAIN_ERRORS[kind]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(channel, "Fail")({"kind": kind}, metadata=ALICE_MD, timeout=5)
    assert caught.value.code() == code
    assert caught.value.details() == error.message

    # ... and a caller turns it back into the same domain error.
    again = error_from_rpc(caught.value)
    assert type(again) is type(error)
    assert again.message == error.message
    if isinstance(error, errors.InvalidArgument):
        assert isinstance(again, errors.InvalidArgument)
        assert again.field == "replicas"
    if isinstance(error, errors.ConcurrencyError):
        assert isinstance(again, errors.ConcurrencyError)
        assert (again.stream_id, again.expected_version) == ("deployment-7", 3)


async def test_unknown_exception_is_internal_with_generic_message(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="shipyard_core.grpckit.errors"),
        pytest.raises(grpc.aio.AioRpcError) as caught,
    ):
        await unary(channel, "Fail")({"kind": "bug"}, metadata=ALICE_MD, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details()
    prefix = INTERNAL_MESSAGE.split("{reference}")[0]
    assert details.startswith(prefix)
    reference = details[len(prefix) :]
    assert reference
    for leak in ("hunter2", "postgres", "RuntimeError", "Traceback", "fail"):
        assert leak not in details

    # The log has the traceback, under the same reference.
    logged = [r for r in caplog.records if getattr(r, "reference", None) == reference]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert "hunter2" in caplog.text
    assert f"/{SERVICE}/Fail" in logged[0].getMessage()

    # Re-raised by a caller, it stays a bug: outside the table, hence INTERNAL there too.
    assert type(error_from_rpc(caught.value)) is errors.ShipyardError


async def test_unknown_status_from_a_callee_is_not_a_known_domain_error() -> None:
    class FakeRpcError(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.DEADLINE_EXCEEDED

        def details(self) -> str:
            return "took too long"

    assert isinstance(error_from_rpc(FakeRpcError()), errors.Unavailable)


# --- authentication -------------------------------------------------------------------------


async def test_call_without_token_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(channel, "WhoAmI")({}, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == MISSING_TOKEN_MESSAGE


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (bearer_metadata("nope"), "unknown or revoked token"),
        ((("authorization", "Basic YWxpY2U6eA=="),), "malformed authorization metadata"),
        ((("authorization", "Bearer "),), "malformed authorization metadata"),
    ],
)
async def test_bad_token_is_unauthenticated(
    channel: grpc.aio.Channel, metadata: Any, expected: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(channel, "WhoAmI")({}, metadata=metadata, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert expected in caught.value.details()


async def test_handler_sees_the_principal_of_a_valid_token(channel: grpc.aio.Channel) -> None:
    answer = await unary(channel, "WhoAmI")({}, metadata=ALICE_MD, timeout=5)
    assert (answer["user"], answer["admin"], answer["groups"]) == ("alice", False, ["team-a"])
    root = await unary(channel, "WhoAmI")({}, metadata=bearer_metadata("root-token"), timeout=5)
    assert (root["user"], root["admin"]) == ("root", True)


async def test_public_method_needs_no_token(
    channel: grpc.aio.Channel, authenticator: FakeAuthenticator
) -> None:
    before = authenticator.calls
    assert await unary(channel, "Public")({}, timeout=5) == {"anonymous": True}
    assert authenticator.calls == before


async def test_server_stream_is_authenticated_and_maps_errors(channel: grpc.aio.Channel) -> None:
    stream = channel.unary_stream(
        f"/{SERVICE}/Count", request_serializer=_dumps, response_deserializer=json.loads
    )
    items = [item async for item in stream({"n": 3}, metadata=ALICE_MD, timeout=5)]
    assert items == [{"i": i, "user": "alice"} for i in range(3)]

    received: list[Any] = []

    async def read_all() -> None:
        async for item in stream({"n": 2, "then_fail": True}, metadata=ALICE_MD, timeout=5):
            received.append(item)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all()
    assert len(received) == 2
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "ran out of things"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream({"n": 1}, timeout=5).read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- tracing and correlation ----------------------------------------------------------------


async def test_client_and_handler_spans_share_the_trace(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    with trace.get_tracer("test").start_as_current_span("cli command") as root:
        answer = await unary(channel, "WhoAmI")({}, metadata=ALICE_MD, timeout=5)
    trace_id = trace.format_trace_id(root.get_span_context().trace_id)
    assert answer["trace_id"] == trace_id

    def finished(kind: trace.SpanKind) -> list[Any]:
        return [
            s
            for s in spans.get_finished_spans()
            if s.kind == kind and s.name == f"{SERVICE}/WhoAmI"
        ]

    # The client span ends from the call's done callback; wait for it.
    await wait_until(
        lambda: bool(finished(trace.SpanKind.CLIENT)) and bool(finished(trace.SpanKind.SERVER))
    )
    (client,) = finished(trace.SpanKind.CLIENT)
    (server,) = finished(trace.SpanKind.SERVER)
    assert client.context.trace_id == server.context.trace_id == root.get_span_context().trace_id
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["enduser.id"] == "alice"


async def test_server_span_records_the_error_status(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    with pytest.raises(grpc.aio.AioRpcError):
        await unary(channel, "Fail")({"kind": "Unavailable"}, metadata=ALICE_MD, timeout=5)
    await wait_until(
        lambda: any(s.kind == trace.SpanKind.SERVER for s in spans.get_finished_spans())
    )
    (server,) = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert server.status.status_code == trace.StatusCode.ERROR


async def test_correlation_id_travels_with_the_call(channel: grpc.aio.Channel) -> None:
    token = correlation_id_var.set("corr-42")
    try:
        answer = await unary(channel, "WhoAmI")({}, metadata=ALICE_MD, timeout=5)
    finally:
        correlation_id_var.reset(token)
    assert answer["correlation_id"] == "corr-42"
    fresh = await unary(channel, "WhoAmI")({}, metadata=ALICE_MD, timeout=5)
    assert fresh["correlation_id"]
    assert fresh["correlation_id"] != "corr-42"


# --- lifecycle ------------------------------------------------------------------------------


async def test_stop_finishes_calls_and_background_then_runs_hooks() -> None:
    order: list[str] = []
    started = asyncio.Event()
    host = ServiceHost(KitSettings(), authenticator=FakeAuthenticator(), public_methods=["/t.S/"])

    async def slow(request: Any, context: Any) -> Any:
        started.set()
        await host.stopping.wait()
        order.append("call finished")
        return {"ok": True}

    async def background(stop: asyncio.Event) -> None:
        await stop.wait()
        order.append("background stopped")

    async def no_stop_event() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            order.append("cancelled task ended")

    async def close_async() -> None:
        order.append("close 2")

    host.add_generic_handler(
        grpc.method_handlers_generic_handler(
            "t.S",
            {"Slow": grpc.unary_unary_rpc_method_handler(slow, json.loads, _dumps)},
        )
    )
    host.add_background("waits-for-stop", background)
    host.add_background("needs-cancel", no_stop_event)
    host.add_close_hook(lambda: order.append("close 1"))
    host.add_close_hook(close_async)
    await host.start()
    async with grpc.aio.insecure_channel(host.address) as chan:
        call = chan.unary_unary(
            "/t.S/Slow", request_serializer=_dumps, response_deserializer=json.loads
        )
        pending = asyncio.ensure_future(call({}, timeout=10))
        async with asyncio.timeout(5):
            await started.wait()
        await host.stop(grace=0.5)
        assert await pending == {"ok": True}
        with pytest.raises(grpc.aio.AioRpcError):
            await call({}, timeout=1)
    # Calls and background tasks wind down together; close hooks (last added first) after.
    assert set(order[:3]) == {"call finished", "background stopped", "cancelled task ended"}
    assert order[3:] == ["close 2", "close 1"]
    assert host.exit_code == 0
    await host.stop()  # idempotent


async def test_failing_background_task_stops_the_host_with_exit_code_1() -> None:
    host = ServiceHost(KitSettings(), authenticator=FakeAuthenticator())

    async def crash(stop: asyncio.Event) -> None:
        raise RuntimeError("projection exploded")

    host.add_background("projection", crash)
    code = await asyncio.wait_for(host.run(), timeout=10)
    assert code == 1
    assert host.stopping.is_set()


async def test_registration_after_start_is_refused() -> None:
    host = ServiceHost(KitSettings(), authenticator=FakeAuthenticator())
    async with host:
        with pytest.raises(RuntimeError):
            host.add_generic_handler(echo_handler())


async def test_sigterm_finishes_the_in_flight_call_and_exits_0(tmp_path: Path) -> None:
    script = Path(__file__).with_name("_graceful_service.py")
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "SHIPYARD_LOG_JSON": "true"},
        )
    assert proc.stdout is not None

    async def line() -> str:
        async with asyncio.timeout(30):
            raw = await proc.stdout.readline()  # type: ignore[union-attr]
        assert raw, f"service exited early: {stderr_path.read_text()}"
        return raw.decode().strip()

    try:
        first = await line()
        assert first.startswith("PORT "), first
        port = int(first.split()[1])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            work = chan.unary_unary(
                "/test.v1.Slow/Work", request_serializer=_dumps, response_deserializer=json.loads
            )
            in_flight = asyncio.ensure_future(work({"n": 7}, timeout=30))
            assert await line() == "STARTED"
            proc.send_signal(signal.SIGTERM)
            assert await in_flight == {"finished": 7}
        rest = [await line() for _ in range(2)]
        assert rest == ["BACKGROUND STOPPED", "CLOSED"]
        async with asyncio.timeout(30):
            code = await proc.wait()
        assert code == 0, stderr_path.read_text()
        log_lines = [
            json.loads(x) for x in stderr_path.read_text().splitlines() if x.startswith("{")
        ]
        assert any(entry["message"] == "stopping: received SIGTERM" for entry in log_lines)
        assert all(entry["service"] == "graceful-test" for entry in log_lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- a generated service: the identity service, and RemoteAuthenticator against it ----------


class FakeIdentity(identity_pb2_grpc.IdentityServiceServicer):
    async def Authenticate(self, request: Any, context: Any) -> Any:
        if request.token != "alice-token":
            raise errors.Unauthenticated("unknown or revoked token")
        return identity_pb2.Principal(user="alice", groups=["team-a"], token_id="t-1")

    async def WhoAmI(self, request: Any, context: Any) -> Any:
        principal = current_principal()
        return identity_pb2.Principal(user=principal.user, admin=principal.admin)


async def test_remote_authenticator_against_a_generated_service() -> None:
    keys = ServiceHost(
        KitSettings(),
        authenticator=FakeAuthenticator(),
        public_methods=["/shipyard.keys.v1.IdentityService/Authenticate"],
    )
    names = keys.add_servicer(
        identity_pb2_grpc.add_IdentityServiceServicer_to_server, FakeIdentity()
    )
    assert names == ["shipyard.keys.v1.IdentityService"]
    async with keys:
        remote = RemoteAuthenticator(keys.address, timeout_seconds=5)
        assert await remote.authenticate("alice-token") == ALICE
        with pytest.raises(errors.Unauthenticated, match="unknown or revoked token"):
            await remote.authenticate("other")

        # Registered (generated) handlers go through the interceptor too.
        async with grpc.aio.insecure_channel(keys.address) as chan:
            stub = identity_pb2_grpc.IdentityServiceStub(chan)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.WhoAmI(identity_pb2.WhoAmIRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            me = await stub.WhoAmI(identity_pb2.WhoAmIRequest(), metadata=ALICE_MD, timeout=5)
            assert me.user == "alice"
    await remote.close()

    # With the identity service gone, callers are told it is unavailable.
    gone = RemoteAuthenticator(keys.address, timeout_seconds=2)
    try:
        with pytest.raises(errors.Unavailable, match="identity service unavailable"):
            await gone.authenticate("alice-token")
    finally:
        await gone.close()


async def test_port_in_use_fails_loudly(host: ServiceHost) -> None:
    second = ServiceHost(KitSettings(grpc_port=host.port), authenticator=FakeAuthenticator())
    with pytest.raises(OSError, match="cannot bind the gRPC server"):
        await second.start()


async def test_health_watchers_see_not_serving_on_shutdown() -> None:
    host = ServiceHost(KitSettings(), authenticator=FakeAuthenticator())
    host.add_generic_handler(echo_handler())
    await host.start()
    async with grpc.aio.insecure_channel(host.address) as chan:
        watch = health_pb2_grpc.HealthStub(chan).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
        )
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.ensure_future(host.stop(grace=0.5))
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


def test_a_database_outage_is_unavailable_not_internal() -> None:
    import asyncpg

    from shipyard_core.grpckit.errors import OUTAGE_MESSAGE, status_for_exception

    for exc in (
        asyncpg.CannotConnectNowError("starting up"),
        ConnectionRefusedError("refused"),
        asyncpg.InterfaceError("connection is closed"),
    ):
        code, message = status_for_exception(exc, method="/x/Y")
        assert code == grpc.StatusCode.UNAVAILABLE
        assert message == OUTAGE_MESSAGE
    code, _ = status_for_exception(ValueError("bug"), method="/x/Y")
    assert code == grpc.StatusCode.INTERNAL
