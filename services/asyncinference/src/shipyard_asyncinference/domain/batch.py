"""The BatchJob aggregate: ``pending → running → completed | failed | cancelled``.

A job runs a deployment over every object under an input prefix and writes one output
per input (``<output>/<relative key>.out``). Each finished object is an event, so a job
resumed after a crash skips what is done; an object whose output was written but whose
event was not is done again (same output key: written again, not twice).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shipyard_core.aggregate import Aggregate, DomainEvent
from shipyard_core.errors import FailedPrecondition


class BatchJobCreated(DomainEvent):
    """A caller started a batch job."""

    deployment: str
    group: str
    caller: str
    input: str
    output: str
    at: datetime


class BatchJobListed(DomainEvent):
    """The input objects were listed: the job runs over ``total`` of them."""

    total: int
    at: datetime


class BatchObjectSucceeded(DomainEvent):
    """One input object's predictions were written to ``output_key``."""

    key: str
    output_key: str
    predictions: int
    at: datetime


class BatchObjectFailed(DomainEvent):
    """One input object failed (unreadable, malformed, or the model refused it)."""

    key: str
    reason: str
    at: datetime


class BatchJobFinished(DomainEvent):
    """Every input object has an outcome."""

    done: int
    failed: int
    at: datetime


class BatchJobFailed(DomainEvent):
    """The job cannot run at all (e.g. its input cannot be listed)."""

    error: str
    at: datetime


class BatchJobCancelled(DomainEvent):
    """Cancelled by a caller; objects finished before stay written."""

    by: str
    at: datetime


BATCH_EVENTS: tuple[type[DomainEvent], ...] = (
    BatchJobCreated,
    BatchJobListed,
    BatchObjectSucceeded,
    BatchObjectFailed,
    BatchJobFinished,
    BatchJobFailed,
    BatchJobCancelled,
)

PENDING = "pending"
RUNNING = "running"
ENDED = frozenset({"completed", "failed", "cancelled"})


class BatchJob(Aggregate):
    """One batch job."""

    aggregate_type = "batch_job"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.status = ""
        self.deployment = ""
        self.group = ""
        self.caller = ""
        self.input = ""
        self.output = ""
        self.total = 0
        self.done: set[str] = set()
        self.failures: dict[str, str] = {}
        self.error = ""
        self.created_at: datetime | None = None
        self.finished_at: datetime | None = None

    @property
    def ended(self) -> bool:
        """Whether it completed, failed or was cancelled."""
        return self.status in ENDED

    def handled(self, key: str) -> bool:
        """Whether input object ``key`` has an outcome."""
        return key in self.done or key in self.failures

    def create(self, **fields: Any) -> None:
        """Starts the job (the fields of :class:`BatchJobCreated`)."""
        if self.exists:
            raise FailedPrecondition(f"batch job {self.id} exists already")
        self.emit(BatchJobCreated(**fields))

    def listed(self, total: int, at: datetime) -> None:
        """Records how many input objects there are."""
        if self.status == PENDING:
            self.emit(BatchJobListed(total=total, at=at))

    def succeeded(self, key: str, output_key: str, predictions: int, at: datetime) -> None:
        """Records an object's output."""
        if self.status == RUNNING and not self.handled(key):
            self.emit(
                BatchObjectSucceeded(key=key, output_key=output_key, predictions=predictions, at=at)
            )

    def object_failed(self, key: str, reason: str, at: datetime) -> None:
        """Records an object's failure."""
        if self.status == RUNNING and not self.handled(key):
            self.emit(BatchObjectFailed(key=key, reason=reason[:2000], at=at))

    def finish(self, at: datetime) -> None:
        """Ends a running job once every object has an outcome."""
        if self.status == RUNNING and len(self.done) + len(self.failures) >= self.total:
            self.emit(BatchJobFinished(done=len(self.done), failed=len(self.failures), at=at))

    def fail(self, error: str, at: datetime) -> None:
        """Ends a job that cannot run."""
        if not self.ended:
            self.emit(BatchJobFailed(error=error[:2000], at=at))

    def cancel(self, by: str, at: datetime) -> None:
        """Cancels a job that has not ended."""
        if self.ended:
            raise FailedPrecondition(
                f"batch job {self.id} is {self.status}: only a pending or running job can be "
                "cancelled"
            )
        self.emit(BatchJobCancelled(by=by, at=at))

    def apply(self, event: DomainEvent) -> None:
        """Changes state from one event."""
        if isinstance(event, BatchJobCreated):
            self.status = PENDING
            self.deployment = event.deployment
            self.group = event.group
            self.caller = event.caller
            self.input = event.input
            self.output = event.output
            self.created_at = event.at
        elif isinstance(event, BatchJobListed):
            self.status = RUNNING
            self.total = event.total
        elif isinstance(event, BatchObjectSucceeded):
            self.done.add(event.key)
        elif isinstance(event, BatchObjectFailed):
            self.failures[event.key] = event.reason
        elif isinstance(event, BatchJobFinished):
            self.status = "completed"
            self.finished_at = event.at
        elif isinstance(event, BatchJobFailed):
            self.status = "failed"
            self.error = event.error
            self.finished_at = event.at
        elif isinstance(event, BatchJobCancelled):
            self.status = "cancelled"
            self.finished_at = event.at
