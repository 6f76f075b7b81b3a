"""The request protocols of the data plane: their names, error shapes and envelope checks.

The model server (``shipyard-runtime``) validates every request fully and answers in each
protocol's own shape; the gateway checks the *envelope* of small bodies itself so that a
malformed request is a 400 at once, without costing a model server a round trip (or a
scaled-to-zero deployment a wake-up):

- Open Inference Protocol v2: a JSON object with a non-empty ``inputs`` list, each input
  an object with a ``name``, a ``shape`` of non-negative integers, a known ``datatype``
  and ``data`` holding exactly ``prod(shape)`` values (flat or nested); ``parameters`` an
  object and ``outputs`` a list of ``{"name": ...}`` when present.
- KServe v1: a JSON object with an ``instances`` list.
- Seldon: a JSON object with ``data.ndarray``, or ``data.tensor`` with ``shape`` and
  ``values`` holding exactly ``prod(shape)`` values (or a top-level ``jsonData`` /
  ``strData``).
- raw JSON: not checked at all; the body goes to ``predict()`` as is.

What the values mean (4 features or 3, numbers of the right kind) is the model's business
and its server's: those errors come back from it unchanged.

Only bodies up to ``settings.check_body_max_bytes`` are parsed here: parsing is linear in
the body, runs on the gateway's event loop, and the model server checks the same things
anyway, so a large body goes to it unparsed.
"""

from __future__ import annotations

import json
from typing import Any, TypeGuard

from shipyard_gateway.errors import BadRequest, http_reason

__all__ = [
    "ASYNC",
    "GRPC",
    "OIP_DATATYPES",
    "PROTOCOLS",
    "RAW",
    "SELDON",
    "V1",
    "V2",
    "check_kserve_v1",
    "check_oip",
    "check_seldon",
    "error_body",
    "loads",
    "shape_count",
]

V2 = "v2"
"""Open Inference Protocol v2 over REST."""
V1 = "v1"
"""KServe v1."""
SELDON = "seldon"
"""Seldon Core's ``{"data": ...}`` shape."""
RAW = "raw"
"""Raw JSON: the body is ``predict()``'s payload."""
GRPC = "grpc"
"""Open Inference Protocol v2 over gRPC."""
ASYNC = "async"
"""Asynchronous requests (``X-Async-Request: true``), for when the gateway hands them to
the async inference service: the hook is ``MetricsRecorder.record(..., protocol=ASYNC)``."""

PROTOCOLS = (V2, V1, SELDON, RAW, GRPC, ASYNC)
"""Every protocol name, in the order metrics count them."""

OIP_DATATYPES = frozenset(
    {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BF16",
        "BYTES",
    }
)
"""The tensor datatypes of the Open Inference Protocol."""

_DATATYPE_LIST = ", ".join(sorted(OIP_DATATYPES))

_OIP_EXAMPLE = (
    '{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", '
    '"data": [5.1, 3.5, 1.4, 0.2]}]}'
)
_SELDON_EXAMPLE = '{"data": {"ndarray": [[5.1, 3.5, 1.4, 0.2]]}}'
_DECODER = json.JSONDecoder()
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def error_body(protocol: str, status: int, message: str) -> bytes:
    """The error document of ``protocol``: ``{"error": message}`` for OIP, KServe v1 and
    raw JSON; Seldon's ``{"status": {"code", "info", "reason", "status": "FAILURE"}}``."""
    if protocol == SELDON:
        document: dict[str, Any] = {
            "status": {
                "code": status,
                "info": message,
                "reason": http_reason(status),
                "status": "FAILURE",
            }
        }
    else:
        document = {"error": message}
    return _ENCODER.encode(document).encode()


def loads(body: bytes) -> Any:
    """``body`` as JSON (UTF-8, a leading BOM forgiven, as the model server reads it), or
    BadRequest saying what is wrong with it."""
    if not body:
        raise BadRequest("the request body is empty: send a JSON document")
    try:
        text = body.decode()
        if text.startswith("\ufeff"):
            text = text[1:]
        return _DECODER.decode(text)
    # RecursionError: nesting deeper than the decoder's limit.
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def _is_shape(value: Any) -> TypeGuard[list[int]]:
    # `type(...) is int`: true and false are not dimensions.
    return isinstance(value, list) and all(type(dim) is int and dim >= 0 for dim in value)


def shape_count(shape: list[int]) -> int:
    """How many values a tensor of ``shape`` holds (1 for the scalar shape ``[]``)."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def _leaf_count(data: list[Any]) -> int:
    """How many values nested lists hold. Iterative: data nested near the JSON decoder's
    depth limit must not exhaust Python's recursion limit here."""
    count = 0
    stack = [data]
    while stack:
        items = stack.pop()
        for item in items:
            if type(item) is list:
                stack.append(item)
            else:
                count += 1
    return count


def check_oip(body: bytes) -> None:
    """Raises BadRequest unless ``body`` is a well-formed OIP v2 infer request."""
    document = loads(body)
    if not isinstance(document, dict):
        raise BadRequest(f"the request body must be a JSON object like {_OIP_EXAMPLE}")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        what = "is missing" if inputs is None else "must be a non-empty list"
        raise BadRequest(
            f'field "inputs" {what}: send one entry per input tensor, e.g. {_OIP_EXAMPLE}'
        )
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise BadRequest(
                f"inputs[{index}] must be an object with name, shape, datatype and data"
            )
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f'inputs[{index}].name is missing: name the input (e.g. "input-0")')
        shape = tensor.get("shape")
        if not _is_shape(shape):
            raise BadRequest(
                f"inputs[{index}].shape must be a list of non-negative integers (e.g. [1, 4]), "
                f"got {_short(shape)}"
            )
        datatype = tensor.get("datatype")
        if datatype not in OIP_DATATYPES:
            what = (
                "is missing" if datatype is None else f"{_short(datatype)} is not an OIP datatype"
            )
            raise BadRequest(f"inputs[{index}].datatype {what}: use one of {_DATATYPE_LIST}")
        data = tensor.get("data")
        if not isinstance(data, list):
            what = "is missing" if data is None else "must be a list"
            raise BadRequest(f"inputs[{index}].data {what}: give the values (flat row-major)")
        expected = shape_count(shape)
        got = _leaf_count(data)
        if got != expected:
            raise BadRequest(
                f"inputs[{index}].data has {got} values but inputs[{index}].shape {_short(shape)} "
                f"needs {expected}: send {expected} values or fix the shape"
            )
    parameters = document.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise BadRequest('field "parameters" must be an object')
    outputs = document.get("outputs")
    if outputs is not None and not (
        isinstance(outputs, list)
        and all(isinstance(item, dict) and isinstance(item.get("name"), str) for item in outputs)
    ):
        raise BadRequest('field "outputs" must be a list of {"name": ...} objects')


def check_kserve_v1(body: bytes) -> None:
    """Raises BadRequest unless ``body`` is ``{"instances": [...]}``."""
    document = loads(body)
    if not isinstance(document, dict) or "instances" not in document:
        raise BadRequest(
            'field "instances" is missing: send {"instances": [...]}, one entry per instance'
        )
    if not isinstance(document["instances"], list):
        raise BadRequest('field "instances" must be a list, one entry per instance')


def check_seldon(body: bytes) -> None:
    """Raises BadRequest unless ``body`` is a well-formed Seldon prediction request."""
    document = loads(body)
    if not isinstance(document, dict):
        raise BadRequest(f"the request body must be a JSON object like {_SELDON_EXAMPLE}")
    if "data" not in document:
        if "jsonData" in document or "strData" in document:
            return
        raise BadRequest(f'field "data" is missing: send {_SELDON_EXAMPLE}')
    data = document["data"]
    if not isinstance(data, dict):
        raise BadRequest(f'field "data" must be an object like {_SELDON_EXAMPLE}')
    if "ndarray" in data:
        return
    if "tensor" not in data:
        raise BadRequest(f'field "data" needs "ndarray" or "tensor": send {_SELDON_EXAMPLE}')
    tensor = data["tensor"]
    if not isinstance(tensor, dict) or "shape" not in tensor or "values" not in tensor:
        raise BadRequest(
            'field "data.tensor" needs "shape" and "values", e.g. '
            '{"tensor": {"shape": [1, 4], "values": [5.1, 3.5, 1.4, 0.2]}}'
        )
    shape = tensor["shape"]
    if not _is_shape(shape):
        raise BadRequest(
            "data.tensor.shape must be a list of non-negative integers (e.g. [1, 4]), "
            f"got {_short(shape)}"
        )
    values = tensor["values"]
    if not isinstance(values, list):
        raise BadRequest("data.tensor.values must be a flat list of numbers")
    expected = shape_count(shape)
    if len(values) != expected:
        raise BadRequest(
            f"data.tensor.values has {len(values)} values but data.tensor.shape {shape} "
            f"needs {expected}: send {expected} values or fix the shape"
        )


def _short(value: Any) -> str:
    # The caller's own value, echoed so they see what was read; bounded so a megabyte of
    # it does not come back in an error message.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
