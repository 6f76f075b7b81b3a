"""The compiled route table (:class:`Api`): each route with its gRPC types and schemas, and
the OpenAPI 3.1 document generated from it.

Compiling resolves every parameter's and body's schema once, from the gRPC request
message; the app validates requests against exactly these schemas and the document
publishes them, so the two cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from shipyard.imagebuild.v1 import imagebuild_pb2
from shipyard.logging.v1 import logging_pb2
from shipyard_gateway.facade.routes import ROUTES, Param, Route
from shipyard_gateway.facade.schema import SchemaSet

__all__ = ["OPENAPI_VERSION", "Api", "Operation", "field_at"]

OPENAPI_VERSION = "3.1.0"

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {
                    "type": "string",
                    "description": "The gRPC status name (NOT_FOUND, RESOURCE_EXHAUSTED, ...), "
                    "or METHOD_NOT_ALLOWED / PAYLOAD_TOO_LARGE for refusals gRPC has no "
                    "word for.",
                    "examples": ["NOT_FOUND"],
                },
                "message": {
                    "type": "string",
                    "description": "What is wrong and how to fix it, in the service's words.",
                },
                "field": {
                    "type": "string",
                    "description": "The parameter or dotted body field the facade refused.",
                },
            },
        }
    },
}

# Documented on every operation (the "default" response covers 5xx and the rest).
_ERRORS: Mapping[str, tuple[str, str]] = {
    "400": ("BadRequest", "A parameter or the body is invalid (INVALID_ARGUMENT)."),
    "401": ("Unauthenticated", "No bearer token, or an unknown or revoked one."),
    "403": ("PermissionDenied", "The caller may not do this (other group, not an admin)."),
    "404": ("NotFound", "No such resource, or one the caller may not know of."),
    "409": (
        "Conflict",
        "ALREADY_EXISTS, ABORTED (a concurrent change: retry), FAILED_PRECONDITION (the "
        "resource's state forbids it) or RESOURCE_EXHAUSTED (the group's quota refuses it).",
    ),
    "413": ("PayloadTooLarge", "The JSON body is over the facade's limit."),
    "503": ("Unavailable", "A service is unavailable; retry shortly."),
    "504": ("Timeout", "A service did not answer in time; retry shortly."),
}

_TAGS = (
    ("deployments", "Deployments (scheduler)."),
    ("keys", "Client keys of private deployments (keys)."),
    ("images", "Images and builds (imagebuild)."),
    ("quotas", "Group quotas and instance types (quota)."),
    ("identity", "Users and groups (keys)."),
    ("meta", "This document."),
)

_DESCRIPTION = """\
The Shipyard control plane as JSON over HTTP, for the web console and curl users: a
translation of the gRPC services (keys, quota, imagebuild, scheduler).

Every operation but this document needs `Authorization: Bearer <user token>`, which is
passed on to the services: they decide what the caller may see and do.

Errors are `{"error": {"code", "message", "field"?}}`; `code` is the gRPC status name.
Statuses: INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND
404, ALREADY_EXISTS / ABORTED / FAILED_PRECONDITION / RESOURCE_EXHAUSTED (quota) 409,
UNIMPLEMENTED 501, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, anything else 500 with a
reference to the gateway log.

JSON: snake_case proto field names, every field present in responses, enums as
lowercase words, timestamps RFC 3339 (null when unset), 64-bit integers as numbers.
Request bodies refuse unknown fields and wrong types (400 naming the field)."""


def field_at(desc: Descriptor, dotted: str) -> FieldDescriptor:
    """The field at a dotted path (``header.options.python``) of a message type."""
    parts = dotted.split(".")
    field: FieldDescriptor | None = None
    for i, part in enumerate(parts):
        field = desc.fields_by_name.get(part)
        if field is None:
            raise ValueError(f"{desc.full_name} has no field {part!r} (in {dotted!r})")
        if i < len(parts) - 1:
            if field.type != FieldDescriptor.TYPE_MESSAGE:
                raise ValueError(f"{field.full_name} is not a message (in {dotted!r})")
            assert field.message_type is not None
            desc = field.message_type
    assert field is not None
    return field


def _pascal(operation_id: str) -> str:
    return operation_id[:1].upper() + operation_id[1:]


@dataclass(frozen=True)
class Operation:
    """A route with its gRPC types and the schemas its input is checked against."""

    route: Route
    method: MethodDescriptor | None
    request_class: type[Message] | None
    params: tuple[tuple[Param, Mapping[str, Any]], ...]
    """Each parameter with its schema."""
    body_schema: Mapping[str, Any] | None
    response_schema: Mapping[str, Any] | None

    @property
    def grpc_path(self) -> str:
        """``/package.Service/Method``, what the channel calls."""
        assert self.method is not None
        return f"/{self.method.containing_service.full_name}/{self.method.name}"


class Api:
    """The compiled route table and its OpenAPI document."""

    def __init__(self, routes: tuple[Route, ...] = ROUTES) -> None:
        self.schemas = SchemaSet()
        self.error_schema = self.schemas.add("Error", _ERROR_SCHEMA)
        self.operations = tuple(self._compile(route) for route in routes)
        seen: set[str] = set()
        for op in self.operations:
            key = f"{op.route.method} {op.route.path}"
            if key in seen or op.route.operation_id in seen:
                raise ValueError(f"route {key} ({op.route.operation_id}) is declared twice")
            seen.update({key, op.route.operation_id})
        self._documents: dict[str, bytes] = {}

    # compiling

    def _compile(self, route: Route) -> Operation:
        if route.backend is None:
            return Operation(route, None, None, (), None, {"type": "object"})
        method = route.backend.service.methods_by_name.get(route.rpc)
        if method is None:
            raise ValueError(f"{route.backend.service.full_name} has no method {route.rpc}")
        expected_streaming = {
            "unary": (False, False),
            "build_logs": (False, True),
            "log_lines": (False, True),
            "upload": (True, False),
        }[route.kind]
        if (method.client_streaming, method.server_streaming) != expected_streaming:
            raise ValueError(f"{method.full_name} is not a {route.kind} method")
        request_type = method.input_type
        params = tuple((p, self._param_schema(route, request_type, p)) for p in route.params)
        return Operation(
            route,
            method,
            GetMessageClass(request_type),
            params,
            self._body_schema(route, request_type),
            self._response_schema(route, method),
        )

    def _param_schema(self, route: Route, request: Descriptor, param: Param) -> Mapping[str, Any]:
        if param.location == "path" and "{" + param.name + "}" not in route.path:
            raise ValueError(f"{route.path} has no path parameter {param.name!r}")
        if param.schema is not None:
            return param.schema
        if not param.field:
            raise ValueError(f"parameter {param.name!r} of {route.path} needs a field or schema")
        field = field_at(request, param.field)
        if field.is_repeated or field.type == FieldDescriptor.TYPE_MESSAGE:
            raise ValueError(f"parameter {param.name!r} maps to a non-scalar field")
        schema = self.schemas.field_schema(field, input=True)
        if param.location == "path" and schema.get("type") == "string":
            schema["minLength"] = 1  # an empty segment matches no route
        return schema

    def _body_schema(self, route: Route, request: Descriptor) -> Mapping[str, Any] | None:
        body = route.body
        if body is None:
            return None
        desc = request
        if body.field:
            field = field_at(request, body.field)
            if field.type != FieldDescriptor.TYPE_MESSAGE or field.is_repeated:
                raise ValueError(f"body field {body.field!r} of {route.path} is not a message")
            assert field.message_type is not None
            desc = field.message_type
        if body.exclude or not body.field:
            return self.schemas.input_ref(
                desc, exclude=body.exclude, name=f"{_pascal(route.operation_id)}Body"
            )
        return self.schemas.input_ref(desc)

    def _response_schema(self, route: Route, method: MethodDescriptor) -> Mapping[str, Any] | None:
        if route.status == 204:
            return None
        if route.kind == "build_logs":
            line = self.schemas.output_ref(imagebuild_pb2.BuildLogLine.DESCRIPTOR)
            return self.schemas.add(
                "BuildLogs",
                {
                    "type": "object",
                    "required": ["build_id", "lines"],
                    "properties": {
                        "build_id": {"type": "string"},
                        "lines": {"type": "array", "items": line},
                    },
                },
            )
        if route.kind == "log_lines":
            line = self.schemas.output_ref(logging_pb2.LogLine.DESCRIPTOR)
            return self.schemas.add(
                "LogLines",
                {
                    "type": "object",
                    "required": ["deployment", "lines"],
                    "properties": {
                        "deployment": {"type": "string"},
                        "lines": {"type": "array", "items": line},
                    },
                },
            )
        return self.schemas.output_ref(method.output_type)

    # the document

    def document(self, server_url: str) -> dict[str, Any]:
        """The OpenAPI 3.1 document, with ``server_url`` (where the facade is mounted, e.g.
        ``/api/v1``) as its server."""
        paths: dict[str, dict[str, Any]] = {}
        for op in self.operations:
            paths.setdefault(op.route.path, {})[op.route.method.lower()] = self._operation(op)
        responses = {
            name: {
                "description": text,
                "content": {"application/json": {"schema": self.error_schema}},
            }
            for name, text in [*_ERRORS.values(), ("Error", "Any other error (5xx).")]
        }
        responses["Unauthenticated"]["headers"] = {
            "WWW-Authenticate": {"schema": {"type": "string"}}
        }
        return {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": "Shipyard control plane",
                "version": "v1",
                "description": _DESCRIPTION,
            },
            "servers": [{"url": server_url}],
            "security": [{"bearerAuth": []}],
            "tags": [{"name": name, "description": text} for name, text in _TAGS],
            "paths": paths,
            "components": {
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "A user token (`shipyard` CLI: ~/.shipyard/config.json).",
                    }
                },
                "responses": responses,
                "schemas": dict(sorted(self.schemas.components.items())),
            },
        }

    def document_bytes(self, server_url: str) -> bytes:
        """:meth:`document` as JSON, built once per server URL."""
        data = self._documents.get(server_url)
        if data is None:
            data = json.dumps(self.document(server_url), indent=1).encode()
            if len(self._documents) < 8:  # a handful of mount points, not one per request
                self._documents[server_url] = data
        return data

    def _operation(self, op: Operation) -> dict[str, Any]:
        route = op.route
        doc: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "tags": [route.tag],
        }
        if route.description:
            doc["description"] = route.description
        if route.backend is not None:
            doc["x-grpc-method"] = op.grpc_path
        if route.public:
            doc["security"] = []
        if op.params:
            doc["parameters"] = [self._parameter(p, schema) for p, schema in op.params]
        if route.kind == "upload":
            doc["requestBody"] = {
                "required": True,
                "description": "The model folder as a gzipped tar.",
                "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
            }
        elif op.body_schema is not None:
            assert route.body is not None
            media: dict[str, Any] = {"schema": dict(op.body_schema)}
            if route.body.example is not None:
                media["example"] = dict(route.body.example)
            doc["requestBody"] = {
                "required": True,
                "description": route.body.description,
                "content": {"application/json": media},
            }
        doc["responses"] = self._responses(op)
        return doc

    @staticmethod
    def _parameter(param: Param, schema: Mapping[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": param.name,
            "in": param.location,
            "required": param.location == "path" or param.required,
            "description": param.description,
            "schema": dict(schema),
        }
        if param.example is not None:
            doc["example"] = param.example
        return doc

    def _responses(self, op: Operation) -> dict[str, Any]:
        route = op.route
        ok: dict[str, Any] = {"description": route.summary}
        if op.response_schema is not None:
            ok["content"] = {"application/json": {"schema": dict(op.response_schema)}}
        if route.location:
            ok["headers"] = {
                "Location": {
                    "description": "The path of the created resource.",
                    "schema": {"type": "string"},
                }
            }
        responses: dict[str, Any] = {str(route.status): ok}
        if route.public:
            return responses
        for status, (name, _) in _ERRORS.items():
            if status == "413" and route.body is None:
                continue
            responses[status] = {"$ref": f"#/components/responses/{name}"}
        responses["default"] = {"$ref": "#/components/responses/Error"}
        return responses
