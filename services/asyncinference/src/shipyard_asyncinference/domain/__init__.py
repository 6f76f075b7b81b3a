"""The AsyncLot and BatchJob aggregates and their events."""

from shipyard_asyncinference.domain.aggregates import (
    CANCELLED,
    COMPLETED,
    FAILED,
    INLINE,
    OBJECT_PREFIX,
    QUEUED,
    RUNNING,
    STATUSES,
    AsyncRequest,
)
from shipyard_asyncinference.domain.batch import BATCH_EVENTS, BatchJob
from shipyard_asyncinference.domain.events import REQUEST_EVENTS
from shipyard_asyncinference.domain.lots import LOT_EVENTS, AsyncLot, SingleRequest, lot
from shipyard_core.aggregate import EventRegistry

EVENTS = EventRegistry(*BATCH_EVENTS, *REQUEST_EVENTS, *LOT_EVENTS)
"""Every event of the service, for decoding stored ones."""

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "EVENTS",
    "FAILED",
    "INLINE",
    "OBJECT_PREFIX",
    "QUEUED",
    "RUNNING",
    "STATUSES",
    "AsyncLot",
    "AsyncRequest",
    "BatchJob",
    "SingleRequest",
    "lot",
]
