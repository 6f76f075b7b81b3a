"""The envelope every stored and published event shares."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_UNSAFE_SUBJECT = re.compile(r"[.*>\s]")


def subject_token(value: str) -> str:
    """A NATS subject token for an id: dots, wildcards and spaces become ``_``.

    Only used for routing and filtering; the envelope keeps the real stream id."""
    return _UNSAFE_SUBJECT.sub("_", value) or "_"


def subject_for(service: str, aggregate: str, aggregate_id: str) -> str:
    """``events.<service>.<aggregate>.<id>`` as DESIGN.md fixes it."""
    return f"events.{service}.{aggregate}.{subject_token(aggregate_id)}"


@dataclass(frozen=True)
class NewEvent:
    """An event decided by an aggregate, not yet stored."""

    aggregate: str
    aggregate_id: str
    event_type: str
    schema_version: int
    payload: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)
    recorded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def stream_id(self) -> str:
        """Streams are named ``<aggregate>:<id>``, unique within a service."""
        return f"{self.aggregate}:{self.aggregate_id}"


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored (and as carried over JetStream): the shared envelope."""

    service: str
    event_id: uuid.UUID
    stream_id: str
    version: int
    aggregate: str
    event_type: str
    schema_version: int
    payload: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime
    position: int = 0  # the store's position; 0 when the event came from the bus

    @property
    def aggregate_id(self) -> str:
        """The id part of ``<aggregate>:<id>``."""
        return self.stream_id.split(":", 1)[1]

    @property
    def subject(self) -> str:
        """The JetStream subject this event is published on."""
        return subject_for(self.service, self.aggregate, self.aggregate_id)

    def to_json(self) -> dict[str, Any]:
        """The envelope as JSON (the body of the JetStream message)."""
        return {
            "service": self.service,
            "event_id": str(self.event_id),
            "stream_id": self.stream_id,
            "version": self.version,
            "aggregate": self.aggregate,
            "event_type": self.event_type,
            "schema_version": self.schema_version,
            "payload": self.payload,
            "metadata": self.metadata,
            "recorded_at": self.recorded_at.isoformat(),
        }

    def encode(self) -> bytes:
        """The JetStream message body."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: bytes) -> StoredEvent:
        """Parses a JetStream message body; raises ``ValueError`` on a malformed one."""
        try:
            data = json.loads(body)
            return cls(
                service=str(data["service"]),
                event_id=uuid.UUID(data["event_id"]),
                stream_id=str(data["stream_id"]),
                version=int(data["version"]),
                aggregate=str(data["aggregate"]),
                event_type=str(data["event_type"]),
                schema_version=int(data["schema_version"]),
                payload=dict(data["payload"]),
                metadata=dict(data.get("metadata") or {}),
                recorded_at=datetime.fromisoformat(data["recorded_at"]),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a Shipyard event envelope: {exc}") from exc
