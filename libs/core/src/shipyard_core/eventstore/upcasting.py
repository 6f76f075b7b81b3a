"""Event schema versions: upcasters turn an old payload into the current one on read."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from shipyard_core.eventstore.envelope import StoredEvent

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class Upcasters:
    """A chain of ``(event_type, from_version) -> payload`` functions.

    Each upcaster lifts a payload by exactly one version, so a v1 event stored years ago
    passes v1→v2→v3 on its way to today's code. Stored events are never rewritten."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcaster] = {}

    def register(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: ``@upcasters.register("GroupQuotaSet", 1)`` lifts v1 to v2."""

        def decorate(fn: Upcaster) -> Upcaster:
            key = (event_type, from_version)
            if key in self._steps:
                raise ValueError(f"two upcasters for {event_type} v{from_version}")
            self._steps[key] = fn
            return fn

        return decorate

    def upcast(self, event: StoredEvent) -> StoredEvent:
        """The event lifted to the newest version that has upcasters."""
        payload, version = event.payload, event.schema_version
        while (step := self._steps.get((event.event_type, version))) is not None:
            payload = step(dict(payload))
            version += 1
        if version == event.schema_version:
            return event
        return dataclasses.replace(event, payload=payload, schema_version=version)
