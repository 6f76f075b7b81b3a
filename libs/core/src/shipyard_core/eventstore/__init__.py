"""The event store: an append-only ``events`` table per service schema, with its outbox."""

from shipyard_core.eventstore.envelope import NewEvent, StoredEvent, subject_for
from shipyard_core.eventstore.schema import ensure_schema, validate_identifier
from shipyard_core.eventstore.store import EventStore, OutboxMessage, RowsInsert
from shipyard_core.eventstore.upcasting import Upcasters

__all__ = [
    "EventStore",
    "NewEvent",
    "OutboxMessage",
    "RowsInsert",
    "StoredEvent",
    "Upcasters",
    "ensure_schema",
    "subject_for",
    "validate_identifier",
]
