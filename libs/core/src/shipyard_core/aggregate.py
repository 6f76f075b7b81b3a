"""Aggregates decide and emit events; a repository loads and saves them.

Modelled on pyeventsourcing: an aggregate's state is only ever changed by applying its
own events, so loading (replaying its stream) and deciding share one code path."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from shipyard_core.db import Conn
from shipyard_core.errors import ConcurrencyError
from shipyard_core.eventstore import (
    EventStore,
    NewEvent,
    OutboxMessage,
    RowsInsert,
    StoredEvent,
)
from shipyard_core.metadata import current_metadata


class DomainEvent(BaseModel):
    """Base of every domain event. Its type name is the class name; bump
    ``schema_version`` (and register an upcaster) when the payload's shape changes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: ClassVar[int] = 1

    @classmethod
    def event_type(cls) -> str:
        """The stored type name."""
        return cls.__name__


E = TypeVar("E", bound=DomainEvent)


class EventRegistry:
    """Maps stored type names back to event classes."""

    def __init__(self, *classes: type[DomainEvent]) -> None:
        self._classes: dict[str, type[DomainEvent]] = {}
        for cls in classes:
            self.register(cls)

    def register(self, cls: type[E]) -> type[E]:
        """Adds a class; usable as a decorator."""
        self._classes[cls.event_type()] = cls
        return cls

    def decode(self, event: StoredEvent) -> DomainEvent:
        """The domain event of an (already upcast) stored event."""
        cls = self._classes.get(event.event_type)
        if cls is None:
            raise LookupError(f"unknown event type {event.event_type!r}")
        return cls.model_validate(event.payload)


class Aggregate:
    """A consistency boundary with an id, a version and events not yet saved."""

    aggregate_type: ClassVar[str]

    def __init__(self, aggregate_id: str) -> None:
        self.id = aggregate_id
        self.version = 0
        self.pending: list[DomainEvent] = []

    @property
    def exists(self) -> bool:
        """Whether any event (saved or pending) made this aggregate."""
        return self.version > 0 or bool(self.pending)

    def apply(self, event: DomainEvent) -> None:
        """Mutates state from one event. Subclasses override; never raise here."""
        raise NotImplementedError

    def emit(self, event: DomainEvent) -> None:
        """Records a decided event: applies it now, saves it with the aggregate."""
        version = self.version
        self.apply(event)
        if self.version != version:
            # `version` is the stream version the save checks; a domain field of the same
            # name would silently break optimistic concurrency.
            raise TypeError(
                f"{type(self).__name__}.apply() changed `version`; name the domain field otherwise"
            )
        self.pending.append(event)


A = TypeVar("A", bound=Aggregate)


class Repository(Generic[A]):
    """Loads aggregates by replaying their stream and saves their pending events."""

    def __init__(
        self, store: EventStore, factory: Callable[[str], A], registry: EventRegistry
    ) -> None:
        self.store = store
        self.factory = factory
        self.registry = registry

    async def load(self, aggregate_id: str, conn: Conn | None = None) -> A:
        """The aggregate as of its last event (version 0 when it has none)."""
        aggregate = self.factory(aggregate_id)
        stream = f"{aggregate.aggregate_type}:{aggregate_id}"
        return self._replay(aggregate, await self.store.read_stream(stream, conn=conn))

    async def load_many(self, aggregate_ids: Sequence[str], conn: Conn | None = None) -> list[A]:
        """:meth:`load` for several aggregates, in one query, in the order asked."""
        out = [self.factory(aggregate_id) for aggregate_id in aggregate_ids]
        streams = [f"{agg.aggregate_type}:{agg.id}" for agg in out]
        events = await self.store.read_streams(streams, conn=conn)
        return [self._replay(agg, events[stream]) for agg, stream in zip(out, streams, strict=True)]

    def _replay(self, aggregate: A, events: Sequence[StoredEvent]) -> A:
        for stored in events:
            aggregate.apply(self.registry.decode(stored))
            aggregate.version = stored.version
        return aggregate

    async def save(
        self,
        *aggregates: Aggregate,
        conn: Conn | None = None,
        messages: Sequence[OutboxMessage] = (),
        rows: Sequence[RowsInsert] = (),
        metadata_of: Mapping[str, Mapping[str, Any]] | None = None,
        **metadata: Any,
    ) -> list[StoredEvent]:
        """Appends every aggregate's pending events atomically, checking each version.

        Aggregates of other types may be saved in the same transaction (e.g. a user and
        the groups they join). ``messages`` and ``rows`` are written in the same
        statement (:meth:`EventStore.append_streams`); ``metadata_of`` adds metadata per
        aggregate id (e.g. each request's own actor) to ``metadata``."""
        meta = current_metadata(**metadata)
        writes = []
        for agg in aggregates:
            if not agg.pending:
                continue
            own = meta if metadata_of is None else {**meta, **metadata_of.get(agg.id, {})}
            events = [
                NewEvent(
                    aggregate=agg.aggregate_type,
                    aggregate_id=agg.id,
                    event_type=ev.event_type(),
                    schema_version=ev.schema_version,
                    payload=ev.model_dump(mode="json"),
                    metadata=own,
                )
                for ev in agg.pending
            ]
            writes.append((events, agg.version))
        stored = await self.store.append_streams(writes, conn=conn, messages=messages, rows=rows)
        for agg in aggregates:
            agg.version += len(agg.pending)
            agg.pending = []
        return stored


T = TypeVar("T")


async def retry_on_conflict(
    command: Callable[[], Awaitable[T]], attempts: int = 12, base_delay: float = 0.002
) -> T:
    """Runs a load-decide-save command again when another writer won the race.

    Each retry reloads the aggregate, so the decision is made on fresh state; after
    ``attempts`` the ConcurrencyError reaches the caller (ABORTED) instead of looping.
    The backoff doubles up to 64 times ``base_delay`` with random jitter: among N writers
    racing on one stream at least one wins each round, and random (not per-task fixed)
    jitter keeps the same losers from colliding again round after round."""
    for attempt in range(1, attempts + 1):
        try:
            return await command()
        except ConcurrencyError:
            if attempt == attempts:
                raise
            jitter = 0.5 + random.random()  # noqa: S311 - spreading retries, not a secret
            await asyncio.sleep(base_delay * 2 ** min(attempt - 1, 6) * jitter)
    raise AssertionError("unreachable")
