"""JSON ↔ protobuf for the REST facade, and the JSON Schemas of both directions, all
derived from the same protobuf descriptors.

The JSON shape (one rule for every message):

- field names are the proto field names (snake_case); every field is present in a
  response, with its default when unset;
- enums are lowercase words without the enum's prefix (``DEPLOYMENT_STATUS_DEPLOYED`` →
  ``"deployed"``); ``"unspecified"`` in a response means unset or unknown, and a request
  leaves the field out instead;
- ``google.protobuf.Timestamp`` is an RFC 3339 string in UTC, or ``null`` when unset;
- 64-bit integers are JSON numbers (not strings, as the canonical proto3 JSON has them:
  the values here are sizes and counters far below 2^53);
- maps are objects, repeated fields arrays, bytes base64 strings.

:class:`SchemaSet` holds the component schemas the OpenAPI document publishes, and
validates request data against exactly those schemas (:meth:`SchemaSet.validate`) before
:func:`to_message` builds the request message, so the document and the checks cannot
disagree. The validator knows the few JSON Schema keywords the set emits
(:data:`SUPPORTED_KEYWORDS`).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, cast

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = [
    "SUPPORTED_KEYWORDS",
    "SchemaSet",
    "ValidationError",
    "enum_number",
    "enum_word",
    "enum_words",
    "set_field",
    "to_json",
    "to_message",
]

SCHEMA_PREFIX = "#/components/schemas/"

SUPPORTED_KEYWORDS = frozenset(
    {
        # validated
        "$ref",
        "type",
        "properties",
        "required",
        "additionalProperties",
        "enum",
        "minimum",
        "maximum",
        "minLength",
        "items",
        "format",
        "contentEncoding",
        # annotations only
        "title",
        "description",
        "examples",
        "default",
        "contentMediaType",
    }
)
"""Every keyword the schemas of a :class:`SchemaSet` may use (a test holds it to that)."""

_TIMESTAMP = Timestamp.DESCRIPTOR.full_name

_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT64 = (0, 2**64 - 1)
_INT_RANGES: Mapping[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
}
_FLOATS = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})


class ValidationError(Exception):
    """Request data does not match its schema; ``field`` is the dotted path to it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# --- descriptor access (the stubs leave these Optional / a union with upb's types) -----


def _descriptor(message: Message) -> Descriptor:
    return cast(Descriptor, message.DESCRIPTOR)


def _message_type(field: FieldDescriptor) -> Descriptor:
    desc = field.message_type
    if desc is None:
        raise ValueError(f"{field.full_name} is not a message field")
    return desc


def _enum_type(field: FieldDescriptor) -> EnumDescriptor:
    enum = field.enum_type
    if enum is None:
        raise ValueError(f"{field.full_name} is not an enum field")
    return enum


# --- enums ------------------------------------------------------------------------------


def _enum_prefix(enum: EnumDescriptor) -> str:
    # DeploymentStatus → DEPLOYMENT_STATUS_ (the proto style guide's value prefix).
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_word(enum: EnumDescriptor, number: int) -> str:
    """The JSON word of an enum value (``"unspecified"`` for a number this build does not
    know, e.g. from a newer service)."""
    value = enum.values_by_number.get(number)
    if value is None:
        return "unspecified"
    return value.name.removeprefix(_enum_prefix(enum)).lower()


def enum_words(enum: EnumDescriptor, *, with_zero: bool) -> list[str]:
    """Every JSON word of ``enum`` in declaration order (without the zero value, which a
    request expresses by leaving the field out, unless ``with_zero``)."""
    return [enum_word(enum, v.number) for v in enum.values if with_zero or v.number != 0]


def enum_number(enum: EnumDescriptor, word: str) -> int:
    """The number of a JSON word (validated beforehand; KeyError otherwise)."""
    return enum.values_by_name[_enum_prefix(enum) + word.upper()].number


# --- protobuf → JSON ----------------------------------------------------------------------


def _scalar_to_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_word(_enum_type(field), value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if field.type in _FLOATS:
        # JSON has no NaN or infinity; services never send them, but a response must
        # stay valid JSON whatever happens.
        return value if math.isfinite(value) else None
    return value


def _value_to_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if _message_type(field).full_name == _TIMESTAMP:
            if value.seconds == 0 and value.nanos == 0:
                return None
            return str(value.ToJsonString())
        return to_json(value)
    return _scalar_to_json(field, value)


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.is_repeated
        and _message_type(field).GetOptions().map_entry
    )


def to_json(message: Message) -> dict[str, Any]:
    """``message`` as JSON data (the shape in the module docstring)."""
    out: dict[str, Any] = {}
    for field in _descriptor(message).fields:
        value = getattr(message, field.name)
        if _is_map(field):
            value_field = _message_type(field).fields_by_name["value"]
            out[field.name] = {str(k): _value_to_json(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value_to_json(field, v) for v in value]
        else:
            out[field.name] = _value_to_json(field, value)
    return out


# --- JSON → protobuf (after validation) ---------------------------------------------------


def _scalar_from_json(field: FieldDescriptor, value: Any, path: str) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_number(_enum_type(field), value)
    if field.type in _INT_RANGES:
        return int(value)
    if field.type in _FLOATS:
        return float(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError(path, "is not valid base64") from None
    return value


def _set_message(field: FieldDescriptor, value: Any, target: Message, path: str) -> None:
    if _message_type(field).full_name == _TIMESTAMP:
        assert isinstance(target, Timestamp)
        try:
            target.FromJsonString(value)
        except ValueError:
            raise ValidationError(path, "is not an RFC 3339 timestamp") from None
    else:
        to_message(value, target, path=path)


def to_message(data: Mapping[str, Any], message: Message, *, path: str = "") -> None:
    """Sets the fields of ``message`` from JSON data already validated against the input
    schema of its type (:meth:`SchemaSet.input_schema`). A JSON object given for a
    message field marks it present even when empty (``"scaling": {}`` is not "unset")."""
    desc = _descriptor(message)
    for key, value in data.items():
        field = desc.fields_by_name[key]
        where = f"{path}.{key}" if path else key
        if _is_map(field):
            target_map = getattr(message, key)
            value_field = _message_type(field).fields_by_name["value"]
            for k, v in value.items():
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    _set_message(value_field, v, target_map[k], f"{where}.{k}")
                else:
                    target_map[k] = _scalar_from_json(value_field, v, f"{where}.{k}")
        elif field.is_repeated:
            target_list = getattr(message, key)
            for i, item in enumerate(value):
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    _set_message(field, item, target_list.add(), f"{where}[{i}]")
                else:
                    target_list.append(_scalar_from_json(field, item, f"{where}[{i}]"))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            sub = getattr(message, key)
            sub.SetInParent()
            _set_message(field, value, sub, where)
        else:
            setattr(message, key, _scalar_from_json(field, value, where))


def set_field(message: Message, dotted: str, value: Any) -> None:
    """Sets the scalar field at a dotted path (``header.options.python``) from a validated
    JSON value (an enum word becomes its number), marking the messages on the way present."""
    *parents, last = dotted.split(".")
    for part in parents:
        message = getattr(message, part)
        message.SetInParent()
    field = _descriptor(message).fields_by_name[last]
    setattr(message, last, _scalar_from_json(field, value, dotted))


# --- schemas ------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": SCHEMA_PREFIX + name}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_TYPE_WORDS = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean (true or false)",
    "null": "null",
}


def _has_type(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if isinstance(value, bool):  # bool is an int subclass; JSON keeps them apart
        return False
    if kind == "integer":
        # JSON Schema counts 1.0 as an integer.
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, int | float)
    raise ValueError(f"unknown JSON Schema type {kind!r}")


class SchemaSet:
    """Component schemas derived from protobuf messages (an output and an input variant
    of each) plus hand-written ones, and the validator of request data against them."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}

    # registering

    def add(self, name: str, schema: dict[str, Any]) -> dict[str, Any]:
        """Registers a hand-written component; returns a ``$ref`` to it."""
        existing = self.components.get(name)
        if existing is not None and existing != schema:
            raise ValueError(f"component schema {name!r} is defined twice, differently")
        self.components[name] = schema
        return _ref(name)

    @staticmethod
    def name_of(desc: Descriptor, *, input: bool = False) -> str:
        """The component name of a message (``scheduler.v1.Deployment``, and
        ``scheduler.v1.DeploymentInput`` for the request variant)."""
        name = desc.full_name.removeprefix("shipyard.")
        return f"{name}Input" if input else name

    def output_ref(self, desc: Descriptor) -> dict[str, Any]:
        """A ``$ref`` to the response schema of ``desc`` (registered with the messages it
        contains)."""
        name = self.name_of(desc)
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive messages end here
            self.components[name] = self._message_schema(desc, input=False, exclude=())
        return _ref(name)

    def input_ref(
        self, desc: Descriptor, *, exclude: Iterable[str] = (), name: str = ""
    ) -> dict[str, Any]:
        """A ``$ref`` to the request schema of ``desc``: no field required (proto3 has
        defaults), no unknown field allowed, ``exclude``d fields left out (they come from
        the path). ``name`` names the component when fields are excluded."""
        excluded = tuple(exclude)
        if excluded and not name:
            raise ValueError("a schema with excluded fields needs its own name")
        name = name or self.name_of(desc, input=True)
        if name not in self.components:
            self.components[name] = {}
            self.components[name] = self._message_schema(desc, input=True, exclude=excluded)
        return _ref(name)

    def _message_schema(
        self, desc: Descriptor, *, input: bool, exclude: tuple[str, ...]
    ) -> dict[str, Any]:
        unknown = set(exclude) - set(desc.fields_by_name)
        if unknown:
            raise ValueError(f"{desc.full_name} has no field(s) {sorted(unknown)}")
        properties = {
            f.name: self.field_schema(f, input=input) for f in desc.fields if f.name not in exclude
        }
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if input:
            schema["additionalProperties"] = False
        else:
            schema["required"] = list(properties)
        return schema

    def field_schema(self, field: FieldDescriptor, *, input: bool) -> dict[str, Any]:
        """The schema of one field (a scalar, message, list or map) in either direction."""
        if _is_map(field):
            value_field = _message_type(field).fields_by_name["value"]
            return {
                "type": "object",
                "additionalProperties": self._single_schema(value_field, input=input),
            }
        if field.is_repeated:
            return {"type": "array", "items": self._single_schema(field, input=input)}
        return self._single_schema(field, input=input)

    def _single_schema(self, field: FieldDescriptor, *, input: bool) -> dict[str, Any]:
        kind = field.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            if _message_type(field).full_name == _TIMESTAMP:
                if input:
                    return {"type": "string", "format": "date-time"}
                return {"type": ["string", "null"], "format": "date-time"}
            if input:
                return self.input_ref(_message_type(field))
            return self.output_ref(_message_type(field))
        if kind == FieldDescriptor.TYPE_ENUM:
            return {"type": "string", "enum": enum_words(_enum_type(field), with_zero=not input)}
        if kind in _INT_RANGES:
            low, high = _INT_RANGES[kind]
            return {"type": "integer", "minimum": low, "maximum": high}
        if kind in _FLOATS:
            return {"type": "number"}
        if kind == FieldDescriptor.TYPE_BOOL:
            return {"type": "boolean"}
        if kind == FieldDescriptor.TYPE_STRING:
            return {"type": "string"}
        if kind == FieldDescriptor.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        raise ValueError(f"field {field.full_name} has a type the facade does not map")

    # validating

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """``schema`` with its ``$ref`` (if any) followed."""
        seen = 0
        while "$ref" in schema:
            ref = schema["$ref"]
            if not ref.startswith(SCHEMA_PREFIX) or seen > 32:
                raise ValueError(f"cannot resolve {ref!r}")
            schema = self.components[ref.removeprefix(SCHEMA_PREFIX)]
            seen += 1
        return schema

    def validate(self, value: Any, schema: Mapping[str, Any], path: str) -> None:
        """Raises :class:`ValidationError` naming the first part of ``value`` (at
        ``path``) that ``schema`` refuses."""
        schema = self.resolve(schema)
        kinds = schema.get("type")
        if kinds is not None:
            options = [kinds] if isinstance(kinds, str) else list(kinds)
            if not any(_has_type(value, k) for k in options):
                wanted = " or ".join(_TYPE_WORDS[k] for k in options)
                raise ValidationError(path, f"must be {wanted}, got {_describe(value)}")
        if "enum" in schema and value not in schema["enum"]:
            choices = ", ".join(repr(v) for v in schema["enum"])
            raise ValidationError(path, f"must be one of {choices}, got {_describe(value)}")
        if isinstance(value, str):
            self._validate_string(value, schema, path)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            self._validate_number(value, schema, path)
        elif isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                self.validate(item, schema["items"], f"{path}[{i}]")
        elif isinstance(value, dict):
            self._validate_object(value, schema, path)

    @staticmethod
    def _validate_string(value: str, schema: Mapping[str, Any], path: str) -> None:
        try:
            # Protobuf strings are UTF-8; a JSON "\ud800" escape decodes to a lone
            # surrogate, which has no UTF-8 form.
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(path, "is not valid Unicode text") from None
        if len(value) < schema.get("minLength", 0):
            raise ValidationError(path, "must not be empty")
        if schema.get("format") == "date-time":
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise ValidationError(
                    path, f"must be an RFC 3339 timestamp, got {_describe(value)}"
                ) from None

    @staticmethod
    def _validate_number(value: float, schema: Mapping[str, Any], path: str) -> None:
        try:
            finite = math.isfinite(float(value))
        except OverflowError:
            finite = False
        if not finite:
            raise ValidationError(path, "must be a finite number")
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and value < low:
            raise ValidationError(path, f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise ValidationError(path, f"must be at most {high}, got {value}")

    def _validate_object(self, value: dict[str, Any], schema: Mapping[str, Any], path: str) -> None:
        def at(key: str) -> str:
            return f"{path}.{key}" if path else key

        properties: Mapping[str, Any] = schema.get("properties", {})
        for key in schema.get("required", ()):
            if key not in value:
                raise ValidationError(at(key), "is required")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                self.validate(item, properties[key], at(key))
            elif extra is False:
                known = ", ".join(properties) or "none"
                raise ValidationError(at(key), f"is not a known field (known fields: {known})")
            elif isinstance(extra, Mapping):
                self.validate(item, extra, at(key))
