"""The AsyncRequest aggregate: ``queued → running → completed | failed | cancelled``.

A running request whose attempt fails goes back to ``queued`` (with the error) until its
attempts are used up. Every decision is taken here; the application layer only loads,
asks and saves (with the optimistic concurrency check, so two workers racing on one
request cannot both complete it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shipyard_asyncinference.domain.events import (
    AsyncRequestAttemptFailed,
    AsyncRequestCancelled,
    AsyncRequestCompleted,
    AsyncRequestExpired,
    AsyncRequestFailed,
    AsyncRequestQueued,
    AsyncRequestStarted,
)
from shipyard_core.aggregate import Aggregate, DomainEvent
from shipyard_core.errors import FailedPrecondition

QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})

INLINE = "inline"
"""Location of a payload or result kept in PostgreSQL."""
OBJECT_PREFIX = "object:"
"""Location prefix of a payload or result in the object store."""


class AsyncRequest(Aggregate):
    """One asynchronous prediction request."""

    aggregate_type = "async_request"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.status = ""
        self.deployment = ""
        self.group = ""
        self.caller = ""
        self.protocol = ""
        self.model_path = ""
        self.content_type = ""
        self.client_request_id = ""
        self.payload_bytes = 0
        self.payload_location = ""
        self.max_attempts = 1
        self.attempts = 0
        self.error = ""
        self.created_at: datetime | None = None
        self.started_at: datetime | None = None
        self.finished_at: datetime | None = None
        self.expires_at: datetime | None = None
        self.expired = False
        self.result_status = 0
        self.result_content_type = ""
        self.result_bytes = 0
        self.result_location = ""

    @property
    def terminal(self) -> bool:
        """Whether it ended (completed, failed or cancelled)."""
        return self.status in TERMINAL

    # -- decisions -------------------------------------------------------------------

    def queue(self, **fields: Any) -> None:
        """Accepts a new request (the fields of :class:`AsyncRequestQueued`)."""
        if self.exists:
            raise FailedPrecondition(f"async request {self.id} exists already")
        self.emit(AsyncRequestQueued(**fields))

    def start(self, worker: str, at: datetime) -> int | None:
        """A worker takes the request: the attempt number, or None when there is nothing
        to run (it ended, or its attempts are used up: then it fails here)."""
        if self.terminal or not self.exists:
            return None
        if self.attempts >= self.max_attempts:
            # The last attempt's worker died mid-request (else it would have recorded
            # its outcome): that was the last chance.
            self.emit(
                AsyncRequestFailed(
                    attempts=self.attempts,
                    error=self.error
                    or f"the worker running attempt {self.attempts} stopped before it ended",
                    at=at,
                )
            )
            return None
        attempt = self.attempts + 1
        self.emit(AsyncRequestStarted(attempt=attempt, worker=worker, at=at))
        return attempt

    def attempt_failed(self, attempt: int, error: str, *, final: bool, at: datetime) -> bool:
        """Records a failed attempt: queued again (True) while attempts are left and the
        error is not ``final``, else failed (False). Ignored (False) when the request
        moved on meanwhile (another worker's attempt)."""
        if self.status != RUNNING or self.attempts != attempt:
            return False
        if final or attempt >= self.max_attempts:
            if not final:
                error = f"gave up after {attempt} attempts; last error: {error}"
            self.emit(AsyncRequestFailed(attempts=attempt, error=error, at=at))
            return False
        self.emit(AsyncRequestAttemptFailed(attempt=attempt, error=error, at=at))
        return True

    def complete(self, attempt: int, **fields: Any) -> bool:
        """Stores the outcome of ``attempt``; False (nothing recorded) when the request
        ended already or another attempt runs: a result is only ever written once."""
        if self.status != RUNNING or self.attempts != attempt:
            return False
        self.emit(AsyncRequestCompleted(attempt=attempt, **fields))
        return True

    def cancel(self, by: str, at: datetime) -> None:
        """Cancels a queued request."""
        if self.status != QUEUED:
            raise FailedPrecondition(
                f"async request {self.id} is {self.status}: only a queued request can be cancelled"
            )
        self.emit(AsyncRequestCancelled(by=by, at=at))

    def expire(self, at: datetime) -> None:
        """Removes payload and result after the retention period; a request still
        unfinished then fails first."""
        if self.expired:
            return
        if not self.terminal:
            self.emit(
                AsyncRequestFailed(
                    attempts=self.attempts,
                    error="not finished within the retention period; removed",
                    at=at,
                )
            )
        self.emit(AsyncRequestExpired(at=at))

    # -- state -----------------------------------------------------------------------

    def apply(self, event: DomainEvent) -> None:
        """Changes state from one event."""
        if isinstance(event, AsyncRequestQueued):
            self.status = QUEUED
            self.deployment = event.deployment
            self.group = event.group
            self.caller = event.caller
            self.protocol = event.protocol
            self.model_path = event.model_path
            self.content_type = event.content_type
            self.client_request_id = event.client_request_id
            self.payload_bytes = event.payload_bytes
            self.payload_location = event.payload_location
            self.max_attempts = event.max_attempts
            self.created_at = event.at
            self.expires_at = event.expires_at
        elif isinstance(event, AsyncRequestStarted):
            self.status = RUNNING
            self.attempts = event.attempt
            self.started_at = event.at
        elif isinstance(event, AsyncRequestAttemptFailed):
            self.status = QUEUED
            self.error = event.error
        elif isinstance(event, AsyncRequestCompleted):
            self.status = COMPLETED
            self.error = ""
            self.finished_at = event.at
            self.result_status = event.status
            self.result_content_type = event.content_type
            self.result_bytes = event.result_bytes
            self.result_location = event.result_location
        elif isinstance(event, AsyncRequestFailed):
            self.status = FAILED
            self.error = event.error
            self.finished_at = event.at
        elif isinstance(event, AsyncRequestCancelled):
            self.status = CANCELLED
            self.finished_at = event.at
        elif isinstance(event, AsyncRequestExpired):
            self.expired = True
