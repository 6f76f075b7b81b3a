"""Which bus messages the prefetcher acts on (the end-to-end path is in test_lifecycle)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from shipyard_core.eventstore import StoredEvent
from shipyard_scheduler.adapters.prefetch import PackToFetch, pack_of


def _envelope(event_type: str = "ImageVersionCreated", **payload: Any) -> bytes:
    """An imagebuild event as the bus carries it."""
    data = {"version": 3, "digest": "ab" * 32, "pack_key": "images/iris/sha256/abab", **payload}
    return StoredEvent(
        service="imagebuild",
        event_id=uuid.uuid4(),
        stream_id="image:team-a/iris",
        version=4,
        aggregate="image",
        event_type=event_type,
        schema_version=2,
        payload=data,
        metadata={},
        recorded_at=datetime.now(UTC),
    ).encode()


def test_a_new_pack_image_is_fetched() -> None:
    assert pack_of(_envelope()) == PackToFetch("iris:3", "ab" * 32, "images/iris/sha256/abab")
    assert pack_of(_envelope(kind="pack")) is not None


def test_everything_else_is_ignored() -> None:
    assert pack_of(_envelope("ImageReadmeChanged")) is None
    assert pack_of(_envelope(kind="oci", pack_key="")) is None  # a cluster build: no pack
    assert pack_of(b"not json") is None
    assert pack_of(json.dumps({"event_type": "ImageVersionCreated"}).encode()) is None
