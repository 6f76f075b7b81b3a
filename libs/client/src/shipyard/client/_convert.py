"""Small conversions shared by the wrappers (protobuf values to plain Python)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp


def enum_name(name_of: Callable[[Any], str], value: int, prefix: str) -> str:
    """A protobuf enum value as a lowercase word without its prefix
    (``DEPLOYMENT_STATUS_DEPLOYED`` → ``"deployed"``); ``"unspecified"`` for values this
    client does not know (a newer server). ``name_of`` is the enum's ``Name``."""
    try:
        name = name_of(value)
    except ValueError:
        return "unspecified"
    return name.removeprefix(prefix).lower()


def to_datetime(ts: Timestamp) -> datetime | None:
    """A protobuf timestamp as an aware UTC datetime; ``None`` when it is unset."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def parse_datetime(text: Any) -> datetime | None:
    """Parses an ISO 8601 timestamp from a JSON envelope; ``None`` when absent or unparsable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        # Python 3.11's fromisoformat accepts a trailing "Z".
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def plain(value: Any) -> Any:
    """Dataclasses, lists, dicts and datetimes as JSON-ready values (datetimes as ISO 8601)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


class PlainData:
    """Mixin for the client's dataclasses: ``to_dict()`` gives JSON-ready data."""

    def to_dict(self) -> dict[str, Any]:
        """The object as a JSON-ready dict (what ``--json`` prints)."""
        data = plain(self)
        assert isinstance(data, dict)
        return data
