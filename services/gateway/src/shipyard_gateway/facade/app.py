"""The REST facade as an aiohttp sub-application: JSON over HTTP in, gRPC out.

Mount it on the gateway's HTTP app (what the lead does in ``main.build``)::

    from shipyard_gateway.facade import API_PREFIX, build_facade
    app.add_subapp(API_PREFIX, build_facade(settings))   # settings: *_addr fields

or run it alone (tests)::

    root = web.Application()
    root.add_subapp("/api/v1", build_facade(FacadeAddresses(...)))

Each request: the bearer token is checked for presence (the services decide whether it
is valid) → path and query parameters and the JSON body are validated against the
schemas the OpenAPI document publishes → the gRPC request is built → the call carries
``authorization: Bearer <token>`` (and the caller's ``traceparent``) → the answer is
converted to JSON, or the gRPC status to an HTTP error through THE table in
:mod:`shipyard_gateway.facade.errors`. No stack trace, path or SQL ever reaches a caller.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import grpc
from aiohttp import web
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from shipyard_gateway.facade.errors import (
    FacadeError,
    error_for_rpc,
    error_response,
    internal_error,
)
from shipyard_gateway.facade.openapi import Api, Operation
from shipyard_gateway.facade.routes import OPTIONAL_ADDRESSES, ROUTES
from shipyard_gateway.facade.schema import ValidationError, set_field, to_json, to_message

__all__ = [
    "API_PREFIX",
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_UPLOAD_TIMEOUT",
    "MAX_JSON_BYTES",
    "AddressesLike",
    "FacadeAddresses",
    "build_facade",
    "mount_facade",
]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
"""Where the gateway mounts the facade; the document is at ``/api/v1/openapi.json``."""

DEFAULT_CALL_TIMEOUT = 30.0
"""Deadline of one gRPC call (seconds); past it the caller gets 504."""

DEFAULT_UPLOAD_TIMEOUT = 600.0
"""Deadline of a model-folder upload (``POST /builds``), which streams the whole body."""

MAX_JSON_BYTES = 4 * 1024 * 1024
"""Largest JSON body accepted (a 256 KiB readme can triple in size when JSON-escaped);
larger ones get 413 PAYLOAD_TOO_LARGE."""

_UPLOAD_CHUNK = 1024 * 1024  # imagebuild takes chunks of at most 1 MiB

# A token travels in gRPC metadata, which takes printable ASCII only; anything else
# cannot be a Shipyard token and must not make the call itself fail.
_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")
_TRACE_HEADER = re.compile(r"[\x20-\x7e]{1,512}")
_TRACE_HEADERS = ("traceparent", "tracestate")

_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar (and '/') besides letters and digits

_ADDRESS_FIELDS = ("keys_addr", "quota_addr", "imagebuild_addr", "scheduler_addr", "logging_addr")


@dataclass(frozen=True)
class FacadeAddresses:
    """``host:port`` of each service the facade calls (the gateway's settings have the
    same field names, so they can be passed instead)."""

    keys_addr: str
    quota_addr: str
    imagebuild_addr: str
    scheduler_addr: str
    logging_addr: str = ""
    """Optional: without it the logs and metrics routes are left out."""


class _HasAddresses(Protocol):
    @property
    def keys_addr(self) -> str: ...
    @property
    def quota_addr(self) -> str: ...
    @property
    def imagebuild_addr(self) -> str: ...
    @property
    def scheduler_addr(self) -> str: ...


AddressesLike = _HasAddresses | Mapping[str, str]
"""Settings (or anything) with ``keys_addr``, ``quota_addr``, ``imagebuild_addr`` and
``scheduler_addr``, or a mapping with those keys."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _addresses(settings: AddressesLike | None) -> dict[str, str]:
    """``{"keys": "host:port", ...}`` from settings or a mapping (fields absent: none)."""
    found: dict[str, str] = {}
    for name in _ADDRESS_FIELDS:
        if settings is None:
            value = None
        elif isinstance(settings, Mapping):
            value = settings.get(name)
        else:
            value = getattr(settings, name, None)
        if value:
            found[name.removesuffix("_addr")] = str(value)
    return found


def _bad_request(error: ValidationError) -> FacadeError:
    field = error.field or "body"
    return FacadeError(400, "INVALID_ARGUMENT", f"{field}: {error.problem}", field=field)


def _reject_constant(name: str) -> Any:
    # json.loads takes NaN and Infinity, which are not JSON and no service wants.
    raise ValueError(f"{name} is not a JSON value")


def _dotted_get(data: Mapping[str, Any], dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        value = value[part]
    return value


class _Facade:
    """The handlers and the gRPC channels of one facade application."""

    def __init__(
        self,
        api: Api,
        addresses: Mapping[str, str],
        channels: Mapping[str, grpc.aio.Channel],
        *,
        call_timeout: float,
        upload_timeout: float,
        max_json_bytes: int,
    ) -> None:
        self.api = api
        self.addresses = dict(addresses)
        self.given_channels = dict(channels)
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.call_timeout = call_timeout
        self.upload_timeout = upload_timeout
        self.max_json_bytes = max_json_bytes
        self.catch_all: web.AbstractResource | None = None

    # lifecycle

    async def channels_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """Opens the channels in the serving loop (grpc.aio channels belong to the loop
        they were made in) and closes the ones it opened."""
        owned: list[grpc.aio.Channel] = []
        for name in sorted(self.addresses.keys() | self.given_channels.keys()):
            channel = self.given_channels.get(name)
            if channel is None:
                channel = grpc.aio.insecure_channel(self.addresses[name])
                owned.append(channel)
            self.channels[name] = channel
        try:
            yield
        finally:
            self.channels.clear()
            for channel in owned:
                await channel.close()

    def channel(self, op: Operation) -> grpc.aio.Channel:
        """The channel serving ``op``'s backend."""
        assert op.route.backend is not None
        channel = self.channels.get(op.route.backend.address)
        if channel is None:
            raise internal_error(op.route.operation_id, "the facade's channels are not open")
        return channel

    # request parts

    @staticmethod
    def metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
        """gRPC metadata: the caller's bearer token (401 without one) and trace context."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise FacadeError(
                401,
                "UNAUTHENTICATED",
                "this API needs a user token: send `Authorization: Bearer <token>` "
                "(the shipyard CLI keeps yours in ~/.shipyard/config.json)",
            )
        if not _TOKEN.fullmatch(token):
            raise FacadeError(401, "UNAUTHENTICATED", "the bearer token is malformed")
        metadata = [("authorization", f"Bearer {token}")]
        for name in _TRACE_HEADERS:
            value = request.headers.get(name)
            if value and _TRACE_HEADER.fullmatch(value):
                metadata.append((name, value))
        return tuple(metadata)

    def params(self, request: web.Request, op: Operation) -> dict[str, Any]:
        """The validated, typed path and query parameters (absent ones left out)."""
        values: dict[str, Any] = {}
        known = {p.name for p, _ in op.params if p.location == "query"}
        for name in request.query:
            if name not in known:
                # Refused rather than ignored: a misspelt filter (?stauts=...) would
                # otherwise silently return everything.
                listed = ", ".join(sorted(known)) or "none"
                problem = f"is not a query parameter of this operation (known: {listed})"
                raise _bad_request(ValidationError(name[:60], problem))
        for param, schema in op.params:
            if param.location == "path":
                raw: str | None = request.match_info.get(param.name)
            else:
                given = request.query.getall(param.name, [])
                if len(given) > 1:
                    raise _bad_request(ValidationError(param.name, "is given more than once"))
                raw = given[0] if given else None
            kind = schema.get("type")
            if raw is None:
                if param.required:
                    raise _bad_request(ValidationError(param.name, "is required"))
                continue
            try:
                value = self._coerce(param.name, raw, kind)
                self.api.schemas.validate(value, schema, param.name)
            except ValidationError as exc:
                raise _bad_request(exc) from None
            values[param.name] = value
        return values

    @staticmethod
    def _coerce(name: str, raw: str, kind: object) -> Any:
        if kind == "integer":
            text = raw.strip()
            # Python refuses to parse more than 4300 digits; the range check says why.
            if not re.fullmatch(r"[+-]?\d{1,4000}", text):
                raise ValidationError(name, f"must be an integer, got {raw[:40]!r}")
            return int(text)
        if kind == "boolean":
            word = raw.strip().lower()
            if word in ("true", "1"):
                return True
            if word in ("false", "0"):
                return False
            raise ValidationError(name, f"must be true or false, got {raw[:40]!r}")
        return raw

    async def json_body(self, request: web.Request, op: Operation) -> Any:
        """The request body parsed and validated against ``op``'s body schema."""
        assert op.body_schema is not None
        limit = self.max_json_bytes
        too_large = FacadeError(
            413,
            "PAYLOAD_TOO_LARGE",
            f"the JSON body is over the limit of {limit} bytes",
            field="body",
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise _bad_request(ValidationError("body", "is required: send a JSON object"))
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise _bad_request(ValidationError("body", "is not UTF-8 text")) from None
        except json.JSONDecodeError as exc:
            problem = f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            raise _bad_request(ValidationError("body", problem)) from None
        except RecursionError:
            raise _bad_request(ValidationError("body", "is nested too deeply")) from None
        except ValueError as exc:  # NaN/Infinity, integers with thousands of digits
            raise _bad_request(ValidationError("body", f"is not valid JSON ({exc})")) from None
        try:
            self.api.schemas.validate(data, op.body_schema, "")
        except ValidationError as exc:
            raise _bad_request(exc) from None
        return data

    async def build_request(self, request: web.Request, op: Operation) -> Message:
        """The gRPC request message from the parameters and the body."""
        assert op.request_class is not None
        route = op.route
        values = self.params(request, op)
        message = op.request_class()
        try:
            for param, _ in op.params:
                if param.field and param.name in values:
                    set_field(message, param.field, values[param.name])
            if route.body is not None and route.kind == "unary":
                data = await self.json_body(request, op)
                target = message
                if route.body.field:
                    for part in route.body.field.split("."):
                        target = getattr(target, part)
                    target.SetInParent()
                to_message(data, target)
        except ValidationError as exc:
            raise _bad_request(exc) from None
        if route.prepare is not None:
            route.prepare(message, values)
        return message

    def rpc_error(self, op: Operation, err: grpc.RpcError) -> FacadeError:
        """The HTTP error for a failed call of ``op``."""
        assert op.route.backend is not None
        return error_for_rpc(err, service=op.route.backend.label, method=op.route.rpc)

    @staticmethod
    def reply(request: web.Request, op: Operation, data: dict[str, Any]) -> web.Response:
        """The success response (``Location`` for created resources)."""
        route = op.route
        if route.status == 204:
            return web.Response(status=204)
        headers: dict[str, str] = {}
        if route.location:
            value = _dotted_get(data, route.location)
            # request.path is decoded: quoted again, a name with CR/LF or non-ASCII in it
            # cannot break (or inject into) the header.
            base = quote(request.path.rstrip("/"), safe=_PATH_SAFE)
            headers["Location"] = f"{base}/{quote(str(value), safe='')}"
        return web.json_response(data, status=route.status, headers=headers or None)

    # handlers

    def handler(self, op: Operation) -> Handler:
        """The aiohttp handler of one operation."""
        kinds: dict[str, Callable[[web.Request, Operation], Awaitable[web.StreamResponse]]] = {
            "unary": self.unary,
            "build_logs": self.build_logs,
            "log_lines": self.log_lines,
            "upload": self.upload,
            "openapi": self.openapi,
        }
        serve = kinds[op.route.kind]

        async def handle(request: web.Request) -> web.StreamResponse:
            return await serve(request, op)

        return handle

    async def unary(self, request: web.Request, op: Operation) -> web.Response:
        """A unary gRPC call."""
        metadata = self.metadata(request)
        message = await self.build_request(request, op)
        call = self.channel(op).unary_unary(
            op.grpc_path,
            request_serializer=type(message).SerializeToString,
            response_deserializer=self._response_class(op).FromString,
        )
        try:
            response = await call(message, metadata=metadata, timeout=self.call_timeout)
        except grpc.RpcError as err:
            raise self.rpc_error(op, err) from None
        return self.reply(request, op, to_json(response))

    async def build_logs(self, request: web.Request, op: Operation) -> web.Response:
        """``StreamBuildLogs`` without follow, collected: ``{"build_id", "lines"}``."""
        metadata = self.metadata(request)
        message = await self.build_request(request, op)
        call = self.channel(op).unary_stream(
            op.grpc_path,
            request_serializer=type(message).SerializeToString,
            response_deserializer=self._response_class(op).FromString,
        )
        try:
            stream = call(message, metadata=metadata, timeout=self.call_timeout)
            lines = [to_json(line) async for line in stream]
        except grpc.RpcError as err:
            raise self.rpc_error(op, err) from None
        build_id = request.match_info.get("build_id", "")
        return self.reply(request, op, {"build_id": build_id, "lines": lines})

    async def log_lines(self, request: web.Request, op: Operation) -> web.Response:
        """``TailLogs`` collected: ``{"deployment", "lines"}`` (its batches flattened)."""
        metadata = self.metadata(request)
        message = await self.build_request(request, op)
        call = self.channel(op).unary_stream(
            op.grpc_path,
            request_serializer=type(message).SerializeToString,
            response_deserializer=self._response_class(op).FromString,
        )
        try:
            stream = call(message, metadata=metadata, timeout=self.call_timeout)
            lines = [to_json(line) async for batch in stream for line in batch.lines]
        except grpc.RpcError as err:
            raise self.rpc_error(op, err) from None
        deployment = request.match_info.get("name", "")
        return self.reply(request, op, {"deployment": deployment, "lines": lines})

    async def upload(self, request: web.Request, op: Operation) -> web.Response:
        """``StartBuild``: the header from the query, then the body streamed in chunks as
        it arrives (never held whole in memory)."""
        metadata = self.metadata(request)
        message = await self.build_request(request, op)
        request_class = type(message)

        async def parts() -> AsyncIterator[Message]:
            yield message
            async for chunk in request.content.iter_chunked(_UPLOAD_CHUNK):
                part = request_class()
                part.chunk = chunk  # type: ignore[attr-defined]
                yield part

        call = self.channel(op).stream_unary(
            op.grpc_path,
            request_serializer=request_class.SerializeToString,
            response_deserializer=self._response_class(op).FromString,
        )
        try:
            response = await call(parts(), metadata=metadata, timeout=self.upload_timeout)
        except grpc.RpcError as err:
            raise self.rpc_error(op, err) from None
        return self.reply(request, op, to_json(response))

    async def openapi(self, request: web.Request, op: Operation) -> web.Response:
        """The OpenAPI document, its server being wherever the facade is mounted."""
        base = request.path.removesuffix(op.route.path) or "/"
        return web.Response(body=self.api.document_bytes(base), content_type="application/json")

    @staticmethod
    def _response_class(op: Operation) -> type[Message]:
        assert op.method is not None
        return GetMessageClass(op.method.output_type)

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        """Every other path under the facade: JSON 405 (with ``Allow``) or 404."""
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is self.catch_all:
                continue
            _, methods = await resource.resolve(request)
            allowed |= methods
        if allowed:
            methods_text = ", ".join(sorted(allowed))
            raise FacadeError(
                405,
                "METHOD_NOT_ALLOWED",
                f"{request.method} is not allowed on {request.path}; use {methods_text}",
                headers={"Allow": methods_text},
            )
        raise FacadeError(
            404,
            "NOT_FOUND",
            f"no such endpoint: {request.method} {request.path}; "
            "the OpenAPI document (openapi.json beside it) lists them",
        )


_HTTP_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as the JSON error; a bug as 500 with a reference (details logged)."""
    try:
        return await handler(request)
    except FacadeError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (a body over client_max_size, ...).
        code = _HTTP_CODES.get(exc.status, "INVALID_ARGUMENT" if exc.status < 500 else "INTERNAL")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = exc.reason or f"HTTP {exc.status}"
        return error_response(FacadeError(exc.status, code, message, headers=headers))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return error_response(internal_error(f"{request.method} {request.path}", exc))


_STATE = web.AppKey("shipyard_facade", _Facade)


def build_facade(
    settings: AddressesLike | None,
    channels: Mapping[str, grpc.aio.Channel] | None = None,
    *,
    call_timeout: float = DEFAULT_CALL_TIMEOUT,
    upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT,
    max_json_bytes: int = MAX_JSON_BYTES,
) -> web.Application:
    """The REST facade as an aiohttp application, to mount at :data:`API_PREFIX`.

    ``settings``: anything with ``keys_addr``, ``quota_addr``, ``imagebuild_addr`` and
    ``scheduler_addr`` (the gateway's settings, a :class:`FacadeAddresses`, or a mapping
    with those keys). ``channels``: open ``grpc.aio`` channels to reuse, keyed ``keys``,
    ``quota``, ``imagebuild``, ``scheduler`` (they win over addresses and are not closed
    by the facade); the facade opens the others on startup and closes them on cleanup.
    Raises ValueError when a service has neither.
    """
    given = dict(channels or {})
    addresses = _addresses(settings)
    missing = [
        f"{name}_addr"
        for name in ("keys", "quota", "imagebuild", "scheduler")
        if name not in given and name not in addresses
    ]
    if missing:
        raise ValueError(f"the REST facade needs the address of each service: {missing} unset")
    served = given.keys() | addresses.keys()
    routes = tuple(
        route
        for route in ROUTES
        if route.backend is None
        or route.backend.address not in OPTIONAL_ADDRESSES
        or route.backend.address in served
    )
    facade = _Facade(
        Api(routes),
        addresses,
        given,
        call_timeout=call_timeout,
        upload_timeout=upload_timeout,
        max_json_bytes=max_json_bytes,
    )
    app = web.Application(middlewares=[_errors])
    app[_STATE] = facade
    app.cleanup_ctx.append(facade.channels_ctx)
    for op in facade.api.operations:
        app.router.add_route(op.route.method, op.route.path, facade.handler(op))
    # Last: everything else under the mount point answers in the same JSON shape.
    facade.catch_all = app.router.add_route("*", "/{tail:.*}", facade.not_found).resource
    return app


def mount_facade(
    app: web.Application,
    settings: AddressesLike | None,
    channels: Mapping[str, grpc.aio.Channel] | None = None,
    **options: Any,
) -> web.Application:
    """Builds the facade (see :func:`build_facade`) and mounts it on ``app`` at
    :data:`API_PREFIX`; returns the facade application."""
    facade = build_facade(settings, channels, **options)
    app.add_subapp(API_PREFIX, facade)
    return facade
