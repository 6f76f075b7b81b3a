"""JSON encoding and the request/response shapes of each protocol.

Everything here is pure (no I/O) and on every request's path: it avoids work the common
case does not need (already-flat data, already-float numbers) and leaves the rest to the C
JSON codec.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
from dataclasses import dataclass
from typing import Any

DEFAULT_OUTPUT = "output-0"
DEFAULT_INPUT = "input-0"

_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
_INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
OIP_DATATYPES = ("BOOL", *sorted(_INT_TYPES), *sorted(_FLOAT_TYPES), "BYTES")


class RequestError(Exception):
    """The caller's mistake: answered with ``status`` (400 unless said otherwise) and this
    message, which names the field and the fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class NotSerializableError(Exception):
    """predict() returned something JSON cannot hold."""


# ---------------------------------------------------------------------------------------
# JSON


def _default(value: Any) -> Any:
    # numpy arrays and scalars (and torch/pandas-like objects) all convert with tolist():
    # duck typing keeps the runtime free of those imports.
    tolist = getattr(value, "tolist", None)
    if tolist is not None and callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    raise TypeError(f"object of type {type(value).__name__} is not JSON-serialisable")


# One encoder reused for every response: json.dumps would build a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_default)
_DECODER = json.JSONDecoder()


def dumps(value: Any) -> bytes:
    """Compact JSON for ``value``; numpy-like values via ``tolist()``, NaN/Infinity as
    ``null`` (strict JSON has neither and many clients reject them)."""
    try:
        return _ENCODER.encode(value).encode()
    except ValueError:
        # Out-of-range floats (or a cycle): the rare path walks the value.
        try:
            return _ENCODER.encode(_finite(value)).encode()
        except (ValueError, RecursionError) as exc:
            raise NotSerializableError(f"the result cannot be encoded as JSON ({exc})") from exc
    except TypeError as exc:
        raise NotSerializableError(str(exc)) from exc


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if not isinstance(value, (str, int)) and hasattr(value, "tolist"):
        return _finite(value.tolist())
    return value


def loads(body: bytes) -> Any:
    """The request body as JSON, or a :class:`RequestError` saying what is wrong with it."""
    if not body:
        raise RequestError("the request body is empty: send a JSON document")
    try:
        # JSON on the wire is UTF-8 (RFC 8259 §8.1): skip json.loads' encoding sniffing,
        # but forgive the BOM some Windows tools prepend.
        text = body.decode()
        if text.startswith("\ufeff"):
            text = text[1:]
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 alike
        raise RequestError(f"the request body is not valid JSON: {exc}") from exc


def native(value: Any) -> Any:
    """``value`` with a top-level numpy-like array or scalar turned into Python values."""
    if isinstance(value, (list, dict, str, int, float)) or value is None:
        return value
    tolist = getattr(value, "tolist", None)
    if tolist is not None and callable(tolist):
        return tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


# ---------------------------------------------------------------------------------------
# Tensors: flat row-major data <-> nested lists


class _Nested(Exception):
    """Data that is not flat: flatten it and validate again."""


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []

    def walk(items: list[Any]) -> None:
        for item in items:
            if type(item) is list:
                walk(item)
            else:
                out.append(item)

    walk(data)
    return out


def _coerce(values: list[Any], datatype: str, field: str) -> list[Any]:
    """``values`` checked (and converted where lossless) for ``datatype``."""
    if datatype in _FLOAT_TYPES:
        for value in values:
            if type(value) is not float:
                break
        else:
            return values  # the common case: JSON numbers with a fraction
        out: list[Any] = []
        for i, value in enumerate(values):
            kind = type(value)
            if kind is float:
                out.append(value)
            elif kind is int:
                out.append(float(value))
            elif kind is list:
                raise _Nested
            else:
                raise RequestError(
                    f"{field}.data[{i}] is {value!r}, but datatype {datatype} needs numbers"
                )
        return out
    if datatype in _INT_TYPES:
        for value in values:
            if type(value) is not int:
                break
        else:
            return values
        out = []
        for i, value in enumerate(values):
            kind = type(value)
            if kind is int:
                out.append(value)
            elif kind is float and value.is_integer():
                out.append(int(value))
            elif kind is list:
                raise _Nested
            else:
                raise RequestError(
                    f"{field}.data[{i}] is {value!r}, but datatype {datatype} needs integers"
                )
        return out
    expected: type = bool if datatype == "BOOL" else str
    for i, value in enumerate(values):
        if type(value) is not expected:
            if type(value) is list:
                raise _Nested
            wanted = "true/false" if expected is bool else "strings"
            raise RequestError(
                f"{field}.data[{i}] is {value!r}, but datatype {datatype} needs {wanted}"
            )
    return values


def _shape(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not all(type(dim) is int and dim >= 0 for dim in value):
        raise RequestError(
            f"{field} must be a list of non-negative integers (e.g. [1, 4]), got {value!r}"
        )
    return value


def _count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _empty(shape: list[int]) -> list[Any]:
    if len(shape) == 1:
        return []
    return [_empty(shape[1:]) for _ in range(shape[0])]


def reshape(flat: list[Any], shape: list[int]) -> Any:
    """Row-major ``flat`` as nested lists of ``shape`` (``len(flat)`` must fit it)."""
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    if not flat:
        return _empty(shape)
    items = flat
    for dim in reversed(shape[1:]):
        items = [items[start : start + dim] for start in range(0, len(items), dim)]
    return items


def _checked_data(values: Any, shape: list[int], datatype: str, field: str) -> list[Any]:
    if not isinstance(values, list):
        raise RequestError(f"{field}.data must be a list (flat row-major or nested)")
    try:
        flat = _coerce(values, datatype, field)
    except _Nested:
        flat = _coerce(_flatten(values), datatype, field)
    count = _count(shape)
    if len(flat) != count:
        raise RequestError(
            f"{field}.data has {len(flat)} values but {field}.shape {shape} needs {count}: "
            f"send {count} values or fix the shape"
        )
    return flat


# ---------------------------------------------------------------------------------------
# Open Inference Protocol v2


@dataclass(frozen=True)
class OipRequest:
    """An OIP infer request turned into predict()'s payload."""

    payload: Any
    id: str | None
    parameters: dict[str, Any] | None
    outputs: list[str] | None


_OIP_EXAMPLE = (
    '{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", '
    '"data": [5.1, 3.5, 1.4, 0.2]}]}'
)


def oip_request(body: Any) -> OipRequest:
    """One input → its nested list; several → ``{name: nested list}``."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object like {_OIP_EXAMPLE}")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        what = "missing" if inputs is None else "must be a non-empty list"
        raise RequestError(
            f'field "inputs" {what}: send one entry per input tensor, e.g. {_OIP_EXAMPLE}'
        )
    decoded: dict[str, Any] = {}
    for index, tensor in enumerate(inputs):
        field = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise RequestError(f"{field} must be an object with name, shape, datatype and data")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f'{field}.name is missing: name the input (e.g. "input-0")')
        if "shape" not in tensor:
            raise RequestError(f"{field}.shape is missing: give the tensor shape, e.g. [1, 4]")
        shape = _shape(tensor["shape"], f"{field}.shape")
        datatype = tensor.get("datatype")
        if datatype not in OIP_DATATYPES:
            what = "is missing" if datatype is None else f"{datatype!r} is not an OIP datatype"
            raise RequestError(f"{field}.datatype {what}: use one of {', '.join(OIP_DATATYPES)}")
        if "data" not in tensor:
            raise RequestError(f"{field}.data is missing: give the values (flat row-major)")
        flat = _checked_data(tensor["data"], shape, datatype, field)
        if name in decoded:
            raise RequestError(f"{field}.name {name!r} is used twice: input names are unique")
        decoded[name] = reshape(flat, shape)
    payload = next(iter(decoded.values())) if len(decoded) == 1 else decoded

    request_id = body.get("id")
    parameters = body.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise RequestError('field "parameters" must be an object')
    outputs = body.get("outputs")
    wanted: list[str] | None = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
            isinstance(item, dict) and isinstance(item.get("name"), str) for item in outputs
        ):
            raise RequestError('field "outputs" must be a list of {"name": ...} objects')
        wanted = [item["name"] for item in outputs]
    return OipRequest(
        payload=payload,
        id=str(request_id) if request_id is not None else None,
        parameters=parameters,
        outputs=wanted,
    )


def _shape_and_flat(value: list[Any] | tuple[Any, ...]) -> tuple[list[int], list[Any]] | None:
    """Shape and row-major leaves of a rectangular nested list; None when ragged."""
    shape: list[int] = []
    probe: Any = value
    while isinstance(probe, (list, tuple)):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    level: list[Any] = list(value) if isinstance(value, tuple) else value
    for dim in shape[1:]:
        nxt: list[Any] = []
        for item in level:
            if not isinstance(item, (list, tuple)) or len(item) != dim:
                return None
            nxt.extend(item)
        level = nxt
    return shape, level


_DATATYPE_BY_KINDS: dict[frozenset[type], str] = {
    frozenset({float}): "FP64",
    frozenset({int, float}): "FP64",
    frozenset({int}): "INT64",
    frozenset({bool}): "BOOL",
    frozenset({str}): "BYTES",
}


_PLAIN = (float, int, str, bool)


def _leaf(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    tolist = getattr(value, "tolist", None)
    return tolist() if tolist is not None and callable(tolist) else value


def _leaf_datatype(flat: list[Any]) -> tuple[str, list[Any]] | None:
    if not flat:
        return "FP64", flat
    kinds = frozenset(map(type, flat))
    datatype = _DATATYPE_BY_KINDS.get(kinds)
    if datatype is not None:
        return datatype, flat
    # numpy scalars in a Python list (np.float64 subclasses float but is not float):
    # convert them, then try once more.
    converted = [_leaf(item) for item in flat]
    datatype = _DATATYPE_BY_KINDS.get(frozenset(map(type, converted)))
    return (datatype, converted) if datatype is not None else None


def _json_tensor(name: str, items: list[Any]) -> dict[str, Any]:
    # Not a tensor (ragged lists, records, None...): one JSON document per element, so the
    # caller still gets everything; the parameter says how to read it.
    data = [dumps(item).decode() for item in items]
    return {
        "name": name,
        "shape": [len(data)],
        "datatype": "BYTES",
        "parameters": {"content_type": "json"},
        "data": data,
    }


def to_tensor(name: str, value: Any) -> dict[str, Any]:
    """One OIP output tensor for ``value`` (nested lists → shape + flat data + datatype)."""
    value = native(value)
    if isinstance(value, (list, tuple)):
        found = _shape_and_flat(value)
        if found is not None:
            shape, flat = found
            typed = _leaf_datatype(flat)
            if typed is not None:
                datatype, data = typed
                return {"name": name, "shape": shape, "datatype": datatype, "data": data}
        return _json_tensor(name, list(value))
    typed = _leaf_datatype([value])
    if typed is not None:
        return {"name": name, "shape": [1], "datatype": typed[0], "data": typed[1]}
    return _json_tensor(name, [value])


def oip_outputs(result: Any, wanted: list[str] | None = None) -> list[dict[str, Any]]:
    """``predict()``'s result as OIP outputs: a dict gives one output per key."""
    result = native(result)
    if isinstance(result, dict):
        names = [str(key) for key in result]
        by_name = dict(zip(names, result.values(), strict=True))
        if wanted:
            unknown = [name for name in wanted if name not in by_name]
            if unknown:
                raise RequestError(
                    f'field "outputs" asks for {", ".join(map(repr, unknown))}, which the '
                    f"model does not return; it returns {', '.join(map(repr, names))}"
                )
            names = wanted
        return [to_tensor(name, by_name[name]) for name in names]
    return [to_tensor(DEFAULT_OUTPUT, result)]


def tensor_metadata(value: Any, default_name: str) -> list[dict[str, Any]]:
    """OIP tensor metadata (name, datatype, shape) describing ``value``; the first dimension
    of a list is the batch, so it is -1 (any size)."""
    value = native(value)
    items = value.items() if isinstance(value, dict) else [(default_name, value)]
    described: list[dict[str, Any]] = []
    for name, item in items:
        tensor = to_tensor(str(name), item)
        shape = list(tensor["shape"])
        if isinstance(native(item), (list, tuple)) and shape:
            shape[0] = -1
        described.append({"name": tensor["name"], "datatype": tensor["datatype"], "shape": shape})
    return described


# ---------------------------------------------------------------------------------------
# KServe v1 and Seldon


def kserve_payload(body: Any) -> Any:
    """``{"instances": [...]}`` → the instances list."""
    if not isinstance(body, dict) or "instances" not in body:
        raise RequestError(
            'field "instances" is missing: send {"instances": [...]}, one entry per instance'
        )
    instances = body["instances"]
    if not isinstance(instances, list):
        raise RequestError('field "instances" must be a list, one entry per instance')
    return instances


_SELDON_EXAMPLE = '{"data": {"ndarray": [[5.1, 3.5, 1.4, 0.2]]}}'


def seldon_payload(body: Any) -> Any:
    """``{"data": {"ndarray": ...}}`` or ``{"data": {"tensor": {"shape", "values"}}}`` (also
    Seldon's top-level ``jsonData`` / ``strData``) → the payload."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object like {_SELDON_EXAMPLE}")
    if "data" not in body:
        if "jsonData" in body:
            return body["jsonData"]
        if "strData" in body:
            return body["strData"]
        raise RequestError(f'field "data" is missing: send {_SELDON_EXAMPLE}')
    data = body["data"]
    if not isinstance(data, dict):
        raise RequestError(f'field "data" must be an object like {_SELDON_EXAMPLE}')
    if "ndarray" in data:
        return data["ndarray"]
    if "tensor" in data:
        tensor = data["tensor"]
        if not isinstance(tensor, dict) or "shape" not in tensor or "values" not in tensor:
            raise RequestError(
                'field "data.tensor" needs "shape" and "values", e.g. '
                '{"tensor": {"shape": [1, 4], "values": [5.1, 3.5, 1.4, 0.2]}}'
            )
        shape = _shape(tensor["shape"], "data.tensor.shape")
        values = tensor["values"]
        if not isinstance(values, list):
            raise RequestError("data.tensor.values must be a flat list of numbers")
        count = _count(shape)
        if len(values) != count:
            raise RequestError(
                f"data.tensor.values has {len(values)} values but data.tensor.shape {shape} "
                f"needs {count}: send {count} values or fix the shape"
            )
        return reshape(values, shape)
    raise RequestError(f'field "data" needs "ndarray" or "tensor": send {_SELDON_EXAMPLE}')


def seldon_response(result: Any) -> dict[str, Any]:
    """Seldon's response shape: ``{"data": {"names", "ndarray"}, "meta": {}}`` (a dict
    result goes in ``jsonData``, as Seldon's own wrapper does)."""
    result = native(result)
    if isinstance(result, dict):
        return {"jsonData": result, "meta": {}}
    names: list[str] = []
    if isinstance(result, (list, tuple)) and result and isinstance(result[0], (list, tuple)):
        names = [f"t:{i}" for i in range(len(result[0]))]
    return {"data": {"names": names, "ndarray": result}, "meta": {}}
