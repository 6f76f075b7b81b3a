"""What every Shipyard gRPC call goes through, on both ends.

Server side, :class:`ServerInterceptor` wraps each method handler (all four kinds) so that
the servicer code stays thin and transport-neutral:

1. a SERVER span starts, child of the ``traceparent`` in the call metadata;
2. the correlation id (``x-correlation-id`` metadata, or a new one) is set for the events
   the call appends;
3. unless the method is public, ``authorization: Bearer <token>`` is resolved through the
   :class:`~shipyard_core.auth.Authenticator` and the handler runs as that principal;
4. whatever the handler raises goes through THE table (``grpckit.errors``).

Health and reflection pass through untouched: load balancers and grpcurl need no token,
and probes every few seconds must not flood the traces.

Client side, :class:`TracingClientInterceptor` opens a CLIENT span per call and puts its
``traceparent`` (and the correlation id) into the outgoing metadata.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import aclosing
from typing import Any, cast

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from shipyard_core.auth import Authenticator, Principal, authenticated_as
from shipyard_core.errors import Unauthenticated
from shipyard_core.grpckit.errors import status_for_exception
from shipyard_core.metadata import correlation_id_var
from shipyard_core.telemetry import extract_context, inject_headers

__all__ = [
    "ALWAYS_PUBLIC_PREFIXES",
    "MISSING_TOKEN_MESSAGE",
    "ServerInterceptor",
    "TracingClientInterceptor",
    "bearer_metadata",
    "bearer_token",
    "is_public_method",
]

log = logging.getLogger(__name__)

ALWAYS_PUBLIC_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Method prefixes that never need a token and are not wrapped at all."""

MISSING_TOKEN_MESSAGE = (
    # S105: the word "token" in a message, not a secret.
    "missing token: pass `authorization: Bearer <token>` metadata "  # noqa: S105
    "(shipyard CLI: run `shipyard up` or set SHIPYARD_TOKEN)"
)
"""What a caller without credentials is told."""

CORRELATION_HEADER = "x-correlation-id"
"""Metadata key carrying the correlation id from call to call (and into event metadata)."""

# Server-side statuses that mean "the server failed" (OpenTelemetry semantic conventions
# for gRPC); client mistakes like NOT_FOUND leave the server span's status unset.
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_MAX_CORRELATION_ID = 128  # caller-supplied; bounded so it cannot bloat every event row


def _metadata_dict(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    # Binary (`-bin`) values are bytes and carry nothing we read; the last value of a
    # repeated key wins, as in HTTP header parsing by most proxies.
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def bearer_token(metadata: Mapping[str, str]) -> str:
    """The token in ``authorization: Bearer <token>`` metadata. Raises Unauthenticated
    (with :data:`MISSING_TOKEN_MESSAGE` when there is none)."""
    value = metadata.get("authorization", "").strip()
    if not value:
        raise Unauthenticated(MISSING_TOKEN_MESSAGE)
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(
            "malformed authorization metadata: expected `authorization: Bearer <token>`"
        )
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates as ``token``: ``metadata=bearer_metadata(t)``."""
    return (("authorization", f"Bearer {token}"),)


def is_public_method(method: str, public: Iterable[str] = ()) -> bool:
    """Whether ``method`` (``/pkg.Service/Method``) needs no token: the health and
    reflection services, an exact entry of ``public``, or an entry ending in ``/`` that
    prefixes it (a whole service)."""
    if method.startswith(ALWAYS_PUBLIC_PREFIXES):
        return True
    return any(
        method == entry or (entry.endswith("/") and method.startswith(entry)) for entry in public
    )


async def _call_unary(behavior: Callable[..., Any], request: Any, context: Any) -> Any:
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _call_streaming(behavior: Callable[..., Any], request: Any, context: Any) -> None:
    # The wrapper is a coroutine that writes through `context.write` rather than an async
    # generator: the span, the principal and the correlation id are then set and reset in
    # one frame, never across a `yield` that a garbage collector might finish in another
    # context. Handlers may still be async generators, coroutines that write themselves,
    # or (sync) generators.
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    if result is None:
        return
    if hasattr(result, "__aiter__"):
        stream = cast(AsyncIterator[Any], result)
        if hasattr(stream, "aclose"):
            async with aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    await context.write(item)
        else:
            async for item in stream:
                await context.write(item)
        return
    for item in result:
        await context.write(item)


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Tracing, authentication and error mapping for every method of a grpc.aio server.

    ``public_methods`` lists full method names (``/shipyard.keys.v1.IdentityService/
    Authenticate``) or service prefixes ending in ``/`` that need no token; their handlers
    see no principal. ``authenticator`` may be None only when every method is public.
    """

    def __init__(
        self,
        authenticator: Authenticator | None,
        public_methods: Iterable[str] = (),
        *,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.public_methods = frozenset(public_methods)
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Returns the handler for the call, wrapped unless it is health or reflection."""
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(ALWAYS_PUBLIC_PREFIXES):
            return handler
        public = is_public_method(method, self.public_methods)
        metadata = _metadata_dict(handler_call_details.invocation_metadata)
        return self._wrap(handler, method, public, metadata)

    def _wrap(
        self, handler: Any, method: str, public: bool, metadata: dict[str, str]
    ) -> grpc.RpcMethodHandler:
        serve = functools.partial(self._serve, method, public, metadata)
        serde = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            unary_behavior = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                return await serve(context, lambda: _call_unary(unary_behavior, request, context))

            return grpc.unary_unary_rpc_method_handler(unary_unary, **serde)
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> None:
                await serve(context, lambda: _call_streaming(stream_behavior, request, context))

            return grpc.unary_stream_rpc_method_handler(unary_stream, **serde)
        if handler.stream_unary is not None:
            client_stream_behavior = handler.stream_unary

            async def stream_unary(requests: Any, context: Any) -> Any:
                return await serve(
                    context, lambda: _call_unary(client_stream_behavior, requests, context)
                )

            return grpc.stream_unary_rpc_method_handler(stream_unary, **serde)
        bidi_behavior = handler.stream_stream

        async def stream_stream(requests: Any, context: Any) -> None:
            await serve(context, lambda: _call_streaming(bidi_behavior, requests, context))

        return grpc.stream_stream_rpc_method_handler(stream_stream, **serde)

    async def _authenticate(self, metadata: Mapping[str, str]) -> Principal:
        token = bearer_token(metadata)
        if self.authenticator is None:
            raise Unauthenticated("this server accepts no tokens: only public methods exist")
        return await self.authenticator.authenticate(token)

    async def _serve(
        self,
        method: str,
        public: bool,
        metadata: Mapping[str, str],
        context: Any,
        work: Callable[[], Awaitable[Any]],
    ) -> Any:
        name = method.lstrip("/")
        service, _, rpc = name.partition("/")
        correlation = metadata.get(CORRELATION_HEADER, "")[:_MAX_CORRELATION_ID]
        correlation_token = correlation_id_var.set(correlation or str(uuid.uuid4()))
        failure: tuple[grpc.StatusCode, str] | None = None
        try:
            with self._tracer.start_as_current_span(
                name,
                context=extract_context(metadata),
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
                # Exceptions are mapped to statuses below; the span records the outcome.
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    principal = None if public else await self._authenticate(metadata)
                    if principal is not None:
                        span.set_attribute("enduser.id", principal.user)
                    with authenticated_as(principal):
                        result = await work()
                    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
                    return result
                except grpc.aio.AbortError:
                    # The handler aborted with a status of its own choosing; it stands.
                    raise
                except Exception as exc:
                    failure = status_for_exception(exc, method=method)
                    code, message = failure
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code in _SERVER_FAULTS:
                        span.set_status(Status(StatusCode.ERROR, message))
                        if code == grpc.StatusCode.INTERNAL:
                            span.record_exception(exc)
        finally:
            correlation_id_var.reset(correlation_token)
        if failure is None:  # pragma: no cover - success returned, AbortError re-raised
            raise RuntimeError("unreachable: a call ended without result or error")
        code, message = failure
        await context.abort(code, message)


class TracingClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Client-side half: a CLIENT span per call, its ``traceparent`` and the current
    correlation id in the outgoing metadata. Pass it to the channel::

        grpc.aio.insecure_channel(addr, interceptors=[TracingClientInterceptor()])
    """

    def __init__(self, *, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        # Tasks that end spans once the call's status is known; kept so they are not
        # garbage-collected half way.
        self._finishing: set[asyncio.Task[None]] = set()

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        """Traces a unary-unary call."""
        return await self._intercept(continuation, client_call_details, request)

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        """Traces a unary-stream call."""
        return await self._intercept(continuation, client_call_details, request)

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        """Traces a stream-unary call."""
        return await self._intercept(continuation, client_call_details, request_iterator)

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        """Traces a stream-stream call."""
        return await self._intercept(continuation, client_call_details, request_iterator)

    async def _intercept(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name = method.lstrip("/")
        service, _, rpc = name.partition("/")
        span = self._tracer.start_span(
            name,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
        )
        headers = inject_headers({}, trace.set_span_in_context(span))
        correlation = correlation_id_var.get()
        if correlation:
            headers[CORRELATION_HEADER] = correlation
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in headers.items():
            metadata[key] = value
        try:
            call = await continuation(details._replace(metadata=metadata), request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.end()
            raise
        call.add_done_callback(lambda done: self._schedule_end(span, done))
        return call

    def _schedule_end(self, span: trace.Span, call: Any) -> None:
        # The status of an aio call is only available through coroutines; the call is done,
        # so the task finishes at once.
        try:
            task = asyncio.get_running_loop().create_task(self._end(span, call))
        except RuntimeError:  # loop already gone (interpreter shutdown)
            span.end()
            return
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _end(self, span: trace.Span, call: Any) -> None:
        try:
            if call.cancelled():
                code, details = grpc.StatusCode.CANCELLED, "cancelled by the caller"
            else:
                code, details = await call.code(), await call.details()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
        except Exception:  # the span must end whatever the call object does
            log.debug("could not read the status of a finished call", exc_info=True)
        finally:
            span.end()
