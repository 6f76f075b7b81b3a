"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``.

The model servers speak OIP over REST/JSON only, so this servicer translates:

- ``ModelInfer``: each input's values come from ``contents`` (the field of its datatype:
  ``bool_contents`` for BOOL, ``int_contents`` for INT8/16/32, ``int64_contents``,
  ``uint_contents`` for UINT8/16/32, ``uint64_contents``, ``fp32_contents`` for FP32 (and
  FP16/BF16, which have no field of their own), ``fp64_contents``, ``bytes_contents`` for
  BYTES, UTF-8 text) or, when the request has ``raw_input_contents``, from the raw bytes
  of the same index: little-endian, decoded by datatype with :mod:`struct` (BYTES
  elements are a 4-byte little-endian length, then the bytes). They become the ``data``
  of the OIP REST JSON, sent to the model server's ``/v2/models/{name}/infer`` through the
  same routing, access, limits and retries as REST. The JSON answer's ``outputs`` come back
  as ``contents`` of their datatype (FP16/BF16 in ``fp32_contents``; never raw; the
  ``null`` the model server writes for a non-finite number becomes NaN).
- ``ModelMetadata``: the model server's ``GET /v2/models/{name}``, ``versions`` being the
  deployment's active revision; ``ModelReady``: from the routing table (a deployment
  scaled to zero is woken and answers false until an instance is ready).
- ``ServerLive``: true while serving; ``ServerReady``: once the routing table is loaded;
  ``ServerMetadata``: ``name`` "shipyard", the gateway's version, no extensions.

The model name is the deployment's name; a ``model_version``, when given, must be the
active revision.

Access: the ServiceHost's interceptor lets this service through without a user token
(it is public to it, see :data:`SERVICE_PREFIX`); the data-plane access check runs here,
through the same code as REST, on the call metadata (``authorization: Bearer <secret>``,
``authorization: Basic ...`` or ``x-api-key: <secret>``).

Status codes come from THE table (:data:`shipyard_gateway.errors.ERROR_STATUS`):
NOT_FOUND unknown deployment or version, UNAUTHENTICATED / PERMISSION_DENIED,
INVALID_ARGUMENT malformed tensors (and the model's own 400s), RESOURCE_EXHAUSTED over the
concurrency limit, UNAVAILABLE stopped or no instance, DEADLINE_EXCEEDED the model server
timed out, INTERNAL the model failed (its message, which holds a request id).
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from shipyard.inference.v2 import oip_pb2, oip_pb2_grpc
from shipyard_gateway.errors import (
    BadGateway,
    BadRequest,
    error_for_upstream_status,
    grpc_status_for_exception,
)
from shipyard_gateway.handler import PredictHandler
from shipyard_gateway.http import SERVER_NAME
from shipyard_gateway.metrics import MetricsRecorder
from shipyard_gateway.protocols import GRPC, OIP_DATATYPES, shape_count
from shipyard_gateway.routing import RoutingTable

__all__ = [
    "SERVICE_PREFIX",
    "InferenceServicer",
    "infer_request_json",
    "infer_response_from_json",
]

SERVICE_PREFIX = "/inference.GRPCInferenceService/"
"""The methods the ServiceHost's interceptor leaves to this servicer's own access check."""

T = TypeVar("T")

# Only these metadata keys matter to the data plane; the rest (user agents, grpc-*)
# is not copied. traceparent is left out on purpose: the interceptor's span already
# continues the caller's trace, and the handler's span nests under it.
# The trace context goes on too: the prediction joins the caller's trace, and the model
# server gets a traceparent, as over REST.
_METADATA_KEYS = frozenset(
    {"authorization", "x-api-key", "x-request-id", "traceparent", "tracestate"}
)

_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "BF16": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# struct codes of the fixed-size datatypes in raw_input_contents (little-endian).
_RAW_CODE = {
    "BOOL": "?",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}

_MAX_REQUEST_ID = 128

_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})

# Reused: json.dumps with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


# --- requests: protobuf → OIP REST JSON ---------------------------------------------------


def _parameter_value(parameter: oip_pb2.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice is not None else None


def _parameters(parameters: Mapping[str, oip_pb2.InferParameter]) -> dict[str, Any]:
    return {key: _parameter_value(value) for key, value in parameters.items()}


def _text(values: Iterable[bytes], field: str) -> list[str]:
    # The model server speaks JSON, which carries text, not bytes.
    try:
        return [value.decode() for value in values]
    except UnicodeDecodeError:
        raise BadRequest(
            f"{field} holds bytes that are not UTF-8 text; the model servers take BYTES "
            "tensors as text"
        ) from None


def _raw_bytes_elements(raw: bytes, count: int, field: str) -> list[str]:
    items: list[bytes] = []
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 4 > end:
            break
        length = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + length > end:
            raise BadRequest(
                f"{field}: a BYTES element says it has {length} bytes but only "
                f"{end - offset} are left; each element is a 4-byte little-endian length, "
                "then the bytes"
            )
        items.append(raw[offset : offset + length])
        offset += length
    if offset != end or len(items) != count:
        raise BadRequest(
            f"{field} holds {len(items)} BYTES elements but the shape needs {count} (each "
            "element is a 4-byte little-endian length, then the bytes)"
        )
    return _text(items, field)


def _raw_values(raw: bytes, datatype: str, count: int, field: str) -> list[Any]:
    """The values of one ``raw_input_contents`` entry (little-endian)."""
    if datatype == "BYTES":
        return _raw_bytes_elements(raw, count, field)
    if datatype == "BF16":
        # bfloat16 is the upper half of a float32: widen each to 4 bytes (zeros below).
        if len(raw) != 2 * count:
            raise BadRequest(
                f"{field} has {len(raw)} bytes but {count} BF16 values need {2 * count}"
            )
        widened = bytearray(4 * count)
        widened[2::4] = raw[0::2]
        widened[3::4] = raw[1::2]
        return list(struct.unpack(f"<{count}f", widened))
    code = _RAW_CODE[datatype]
    size = struct.calcsize(code)
    if len(raw) != size * count:
        raise BadRequest(
            f"{field} has {len(raw)} bytes but {count} {datatype} values need {size * count} "
            f"({size} each, little-endian)"
        )
    return list(struct.unpack(f"<{count}{code}", raw))


def infer_request_json(request: oip_pb2.ModelInferRequest) -> bytes:
    """The OIP REST JSON body of a gRPC ``ModelInferRequest``; BadRequest when its
    tensors are malformed (unknown datatype, values that do not fit the shape, raw
    contents of the wrong size)."""
    raw = request.raw_input_contents
    if not request.inputs:
        raise BadRequest("the request has no inputs: send one InferInputTensor per input")
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "send one per input, in the order of inputs"
        )
    inputs: list[dict[str, Any]] = []
    for index, tensor in enumerate(request.inputs):
        field = f"inputs[{index}]"
        if not tensor.name:
            raise BadRequest(f'{field}.name is missing: name the input (e.g. "input-0")')
        datatype = tensor.datatype
        if datatype not in OIP_DATATYPES:
            raise BadRequest(
                f"{field}.datatype {datatype[:20]!r} is not an OIP datatype: use one of "
                f"{', '.join(sorted(OIP_DATATYPES))}"
            )
        shape = list(tensor.shape)
        if any(dim < 0 for dim in shape):
            raise BadRequest(f"{field}.shape {shape} has a negative dimension")
        count = shape_count(shape)
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(
                    f"{field} has contents while the request has raw_input_contents: use one "
                    "or the other for all inputs"
                )
            data = _raw_values(raw[index], datatype, count, f"raw_input_contents[{index}]")
        else:
            name = _CONTENTS_FIELD[datatype]
            values = getattr(tensor.contents, name)
            data = (
                _text(values, f"{field}.contents.{name}") if datatype == "BYTES" else list(values)
            )
            if len(data) != count:
                raise BadRequest(
                    f"{field}.contents.{name} has {len(data)} values but {field}.shape {shape} "
                    f"needs {count}: send {count} values (a {datatype} tensor takes its values "
                    f"from {name}) or fix the shape"
                )
        entry: dict[str, Any] = {
            "name": tensor.name,
            "shape": shape,
            "datatype": datatype,
            "data": data,
        }
        if tensor.parameters:
            entry["parameters"] = _parameters(tensor.parameters)
        inputs.append(entry)
    document: dict[str, Any] = {"inputs": inputs}
    if request.id:
        document["id"] = request.id
    if request.parameters:
        document["parameters"] = _parameters(request.parameters)
    if request.outputs:
        document["outputs"] = [{"name": output.name} for output in request.outputs]
    return _ENCODER.encode(document).encode()


# --- answers: OIP REST JSON → protobuf ----------------------------------------------------


def _flat(data: list[Any]) -> list[Any]:
    if not any(type(item) is list for item in data):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _set_parameters(target: Any, parameters: Any) -> None:
    if not isinstance(parameters, dict):
        return
    for key, value in parameters.items():
        slot = target[str(key)]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = value
        else:
            slot.string_param = value if isinstance(value, str) else json.dumps(value)


def infer_response_from_json(body: bytes, deployment: str) -> oip_pb2.ModelInferResponse:
    """The ``ModelInferResponse`` of a model server's OIP JSON answer; BadGateway when
    the answer is not one."""
    try:
        document = json.loads(body)
        response = oip_pb2.ModelInferResponse(
            model_name=str(document.get("model_name") or deployment),
            model_version=str(document.get("model_version") or ""),
            id=str(document.get("id") or ""),
        )
        for output in document.get("outputs") or ():
            tensor = response.outputs.add()
            tensor.name = output["name"]
            datatype = tensor.datatype = output["datatype"]
            tensor.shape.extend(output["shape"])
            _set_parameters(tensor.parameters, output.get("parameters"))
            data = _flat(output.get("data") or [])
            name = _CONTENTS_FIELD[datatype]
            if datatype == "BYTES":
                data = [
                    item.encode() if isinstance(item, str) else json.dumps(item).encode()
                    for item in data
                ]
            values = getattr(tensor.contents, name)
            try:
                values.extend(data)
            except TypeError:
                if datatype not in _FLOAT_TYPES:
                    raise
                # JSON has no NaN: the model server writes non-finite numbers as null.
                del values[:]
                values.extend([math.nan if item is None else item for item in data])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise BadGateway(
            f"the model server's answer is not an Open Inference Protocol infer response "
            f"({type(exc).__name__})"
        ) from None
    return response


def _metadata_response(body: bytes, revision: int) -> oip_pb2.ModelMetadataResponse:
    try:
        document = json.loads(body)
        response = oip_pb2.ModelMetadataResponse(
            name=str(document["name"]),
            versions=[str(revision)],
            platform=str(document.get("platform") or ""),
        )
        for key, target in (("inputs", response.inputs), ("outputs", response.outputs)):
            for tensor in document.get(key) or ():
                entry = target.add()
                entry.name = str(tensor["name"])
                entry.datatype = str(tensor["datatype"])
                entry.shape.extend(tensor["shape"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise BadGateway(
            f"the model server's metadata is not an Open Inference Protocol answer "
            f"({type(exc).__name__})"
        ) from None
    return response


def _upstream_error(status: int, body: bytes) -> Exception:
    """The domain error of a model server's non-2xx answer, with its ``error`` message."""
    message = ""
    try:
        document = json.loads(body)
        if isinstance(document, dict):
            message = str(document.get("error") or "")
    except (ValueError, RecursionError):
        pass
    return error_for_upstream_status(status, message or f"the model server answered {status}")


# --- the servicer --------------------------------------------------------------------------


class InferenceServicer(oip_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the transport-neutral handler."""

    def __init__(
        self,
        handler: PredictHandler,
        table: RoutingTable,
        metrics: MetricsRecorder,
        *,
        version: str,
    ) -> None:
        self.handler = handler
        self.table = table
        self.metrics = metrics
        self.version = version

    @staticmethod
    def _headers(context: Any, request_id: str = "") -> dict[str, str]:
        headers = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if key in _METADATA_KEYS and isinstance(value, str)
        }
        if request_id and len(request_id) <= _MAX_REQUEST_ID:
            headers["x-request-id"] = request_id
        return headers

    async def _serve(self, context: Any, deployment: str, work: Callable[[], Awaitable[T]]) -> T:
        """Runs ``work``, records the outcome, and turns a failure into the table's
        status (``context.abort``)."""
        start = time.perf_counter()
        try:
            result = await work()
        except Exception as exc:
            code, http_status, message = grpc_status_for_exception(
                exc, where=f"gRPC {deployment!r}"
            )
            self.metrics.record(deployment, http_status, time.perf_counter() - start, GRPC)
            await context.abort(code, message)
            raise  # context.abort raised already; this keeps type checkers informed
        self.metrics.record(deployment, 200, time.perf_counter() - start, GRPC)
        return result

    async def ServerLive(
        self, request: oip_pb2.ServerLiveRequest, context: Any
    ) -> oip_pb2.ServerLiveResponse:
        """True while the gateway serves."""
        return oip_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip_pb2.ServerReadyRequest, context: Any
    ) -> oip_pb2.ServerReadyResponse:
        """True once the routing table is loaded from the scheduler."""
        return oip_pb2.ServerReadyResponse(ready=self.table.synced)

    async def ServerMetadata(
        self, request: oip_pb2.ServerMetadataRequest, context: Any
    ) -> oip_pb2.ServerMetadataResponse:
        """``shipyard``, the gateway's version, no extensions."""
        return oip_pb2.ServerMetadataResponse(name=SERVER_NAME, version=self.version)

    async def ModelReady(
        self, request: oip_pb2.ModelReadyRequest, context: Any
    ) -> oip_pb2.ModelReadyResponse:
        """Whether the deployment has a ready instance (it is woken when scaled to zero)."""

        async def work() -> oip_pb2.ModelReadyResponse:
            route, _ = await self.handler.authorize(
                request.name, self._headers(context), version=request.version
            )
            ready = route.ready and not route.stopped
            if not ready:
                self.handler.wake(request.name)
            return oip_pb2.ModelReadyResponse(ready=ready)

        return await self._serve(context, request.name, work)

    async def ModelMetadata(
        self, request: oip_pb2.ModelMetadataRequest, context: Any
    ) -> oip_pb2.ModelMetadataResponse:
        """The model server's metadata of the deployment's model."""
        deployment = request.name

        async def work() -> oip_pb2.ModelMetadataResponse:
            reply = await self.handler.forward(
                deployment,
                f"/v2/models/{deployment}",
                b"",
                self._headers(context),
                method="GET",
                version=request.version,
            )
            if reply.status != 200:
                raise _upstream_error(reply.status, reply.body)
            route = self.table.get(deployment)
            return _metadata_response(reply.body, route.revision if route is not None else 0)

        return await self._serve(context, deployment, work)

    async def ModelInfer(
        self, request: oip_pb2.ModelInferRequest, context: Any
    ) -> oip_pb2.ModelInferResponse:
        """One inference, translated to the model server's OIP REST JSON and back."""
        deployment = request.model_name

        async def work() -> oip_pb2.ModelInferResponse:
            if not deployment:
                raise BadRequest("model_name is missing: name the deployment to call")
            headers = self._headers(context, request.id)
            # Routing and access first: an unknown deployment or a refused caller is told
            # so before their tensors are looked at.
            _, caller = await self.handler.authorize(
                deployment, headers, version=request.model_version
            )
            body = infer_request_json(request)
            reply = await self.handler.forward(
                deployment,
                f"/v2/models/{deployment}/infer",
                body,
                headers,
                caller,
                version=request.model_version,
            )
            if reply.status != 200:
                raise _upstream_error(reply.status, reply.body)
            return infer_response_from_json(reply.body, deployment)

        return await self._serve(context, deployment, work)
