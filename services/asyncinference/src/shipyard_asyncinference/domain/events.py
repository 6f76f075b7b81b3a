"""The async inference service's events (version 1 each; see docs/events.md).

A request's changes are recorded on its lot's stream (``async_lot:<id>``, see
``lots.py``), or, for a request accepted before lots, on its own
(``async_request:<id>``). Payloads and results are never in the events: they are in
``asyncinference.blobs`` (small) or the object store (large), so the sweeper can really
remove them after the retention period; the events say where they are and how large they
are.
"""

from __future__ import annotations

from datetime import datetime

from shipyard_core.aggregate import DomainEvent


class AsyncRequestQueued(DomainEvent):
    """A caller's request was accepted (the gateway answered 202) and waits for a worker."""

    deployment: str
    group: str
    caller: str
    protocol: str
    model_path: str
    content_type: str
    client_request_id: str
    payload_bytes: int
    payload_sha256: str
    payload_location: str
    """``inline`` (``asyncinference.blobs``) or ``object:<key>``."""
    max_attempts: int
    at: datetime
    expires_at: datetime


class AsyncRequestStarted(DomainEvent):
    """A worker took the request and is calling the model (attempt 1, 2, ...)."""

    attempt: int
    worker: str
    at: datetime


class AsyncRequestAttemptFailed(DomainEvent):
    """An attempt failed and the request is queued again for another one."""

    attempt: int
    error: str
    at: datetime


class AsyncRequestCompleted(DomainEvent):
    """The model answered (2xx); its answer is the stored result."""

    attempt: int
    status: int
    content_type: str
    result_bytes: int
    result_sha256: str
    result_location: str
    """``inline`` (``asyncinference.blobs``) or ``object:<key>``."""
    at: datetime


class AsyncRequestFailed(DomainEvent):
    """The request ended without a result: its attempts are used up, or the answer was
    final (a 4xx of the model, the deployment gone)."""

    attempts: int
    error: str
    at: datetime


class AsyncRequestCancelled(DomainEvent):
    """Cancelled while queued; it never runs."""

    by: str
    at: datetime


class AsyncRequestExpired(DomainEvent):
    """The retention period passed: payload and result were removed."""

    at: datetime


REQUEST_EVENTS: tuple[type[DomainEvent], ...] = (
    AsyncRequestQueued,
    AsyncRequestStarted,
    AsyncRequestAttemptFailed,
    AsyncRequestCompleted,
    AsyncRequestFailed,
    AsyncRequestCancelled,
    AsyncRequestExpired,
)
"""The events of a request's own stream (requests accepted before lots)."""
