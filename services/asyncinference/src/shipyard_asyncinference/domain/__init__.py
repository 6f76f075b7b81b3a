"""The AsyncRequest aggregate and its events."""

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
from shipyard_asyncinference.domain.batch import BatchJob
from shipyard_asyncinference.domain.events import EVENTS

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
    "AsyncRequest",
    "BatchJob",
]
