"""The AsyncLot aggregate: the requests one submission call accepted for one deployment.

Each request keeps its own state machine (:class:`AsyncRequest`, ``queued → running →
completed | failed | cancelled``) and its own rules; the lot is the unit of storage and
messaging, so a burst of requests costs one event per step and one queue message, not
one per request (decision 0035). A lot's members decide as before; the lot records what
they decided as lot events, one per kind of change, listing the requests it concerns.

Ids: a lot id is 24 hex digits (a request id, 32: never mistaken for one). A request id is
random (a UUID4, as before lots): it is the only credential needed to read a public
deployment's result, so a request's id must not tell its siblings'. The service keeps
which lot each request belongs to (``asyncinference.request_lots``, written with the
lot). A request accepted before lots is a :class:`SingleRequest`: a lot of one, on its own
``async_request`` stream, whose id is the request's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, ClassVar

from shipyard_asyncinference.domain.aggregates import AsyncRequest
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
from shipyard_core.errors import NotFound

LOT_ID_LENGTH = 24
"""Hex digits of a lot id (a request id has 32)."""
MAX_LOT_SIZE = 256
"""The most requests one lot holds (a submission call's for one deployment is split)."""


def new_lot_id() -> str:
    """A fresh lot id: 24 random hex digits."""
    return uuid.uuid4().hex[:LOT_ID_LENGTH]


def new_request_id() -> str:
    """A fresh request id: 32 hex digits of a random UUID."""
    return uuid.uuid4().hex


# -- the lot's events: per kind of request change, the requests it concerns ----------


class QueuedRequest(AsyncRequestQueued):
    """One request of :class:`AsyncLotQueued`."""

    request_id: str


class StartedRequest(AsyncRequestStarted):
    """One request of :class:`AsyncLotStarted`."""

    request_id: str


class FailedAttempt(AsyncRequestAttemptFailed):
    """One request of :class:`AsyncLotAttemptsFailed`."""

    request_id: str


class CompletedRequest(AsyncRequestCompleted):
    """One request of :class:`AsyncLotCompleted`."""

    request_id: str


class FailedRequest(AsyncRequestFailed):
    """One request of :class:`AsyncLotRequestsFailed`."""

    request_id: str


class CancelledRequest(AsyncRequestCancelled):
    """One request of :class:`AsyncLotRequestsCancelled`."""

    request_id: str


class ExpiredRequest(AsyncRequestExpired):
    """One request of :class:`AsyncLotExpired`."""

    request_id: str


class AsyncLotQueued(DomainEvent):
    """Requests were accepted (the gateway answered 202 to each) and wait for a worker."""

    requests: list[QueuedRequest]


class AsyncLotStarted(DomainEvent):
    """A worker took these requests and is calling the model (an attempt each)."""

    requests: list[StartedRequest]


class AsyncLotAttemptsFailed(DomainEvent):
    """These requests' attempts failed; they are queued again for another one."""

    requests: list[FailedAttempt]


class AsyncLotCompleted(DomainEvent):
    """The model answered these requests (2xx); each answer is its stored result."""

    requests: list[CompletedRequest]


class AsyncLotRequestsFailed(DomainEvent):
    """These requests ended without a result (attempts used up, or a final answer)."""

    requests: list[FailedRequest]


class AsyncLotRequestsCancelled(DomainEvent):
    """These requests were cancelled while queued; they never run."""

    requests: list[CancelledRequest]


class AsyncLotExpired(DomainEvent):
    """The retention period passed: these requests' payloads and results were removed."""

    requests: list[ExpiredRequest]


_LOT_EVENT: dict[type[DomainEvent], tuple[type[DomainEvent], type[DomainEvent]]] = {
    AsyncRequestQueued: (QueuedRequest, AsyncLotQueued),
    AsyncRequestStarted: (StartedRequest, AsyncLotStarted),
    AsyncRequestAttemptFailed: (FailedAttempt, AsyncLotAttemptsFailed),
    AsyncRequestCompleted: (CompletedRequest, AsyncLotCompleted),
    AsyncRequestFailed: (FailedRequest, AsyncLotRequestsFailed),
    AsyncRequestCancelled: (CancelledRequest, AsyncLotRequestsCancelled),
    AsyncRequestExpired: (ExpiredRequest, AsyncLotExpired),
}

LOT_EVENTS: tuple[type[DomainEvent], ...] = tuple(lot for _, lot in _LOT_EVENT.values())
"""Every event type of a lot stream."""
REQUEST_EVENT_OF: dict[str, str] = {
    lot.event_type(): request.event_type() for request, (_, lot) in _LOT_EVENT.items()
}
"""The request event a lot event's items stand for, by stored type name."""


def request_events(event: DomainEvent) -> Iterator[tuple[str, DomainEvent]]:
    """The per-request changes a lot event records, ``(request id, change)``: each item
    is an instance of the request event it stands for."""
    for item in getattr(event, "requests", ()):
        yield item.request_id, item


class AsyncLot(Aggregate):
    """A lot of async requests of one deployment, accepted together."""

    aggregate_type: ClassVar[str] = "async_lot"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.members: dict[str, AsyncRequest] = {}

    @property
    def deployment(self) -> str:
        """The deployment of the lot's requests."""
        return next((agg.deployment for agg in self.members.values()), "")

    def member(self, request_id: str) -> AsyncRequest:
        """One request of the lot (NotFound when it has no such request)."""
        agg = self.members.get(request_id)
        if agg is None:
            raise NotFound(f"async request {request_id[:64]!r} does not exist")
        return agg

    # -- decisions (the members decide; the lot records) -----------------------------

    def queue(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[AsyncRequest]:
        """Accepts new requests, ``(request id, the fields of AsyncRequestQueued)`` each."""
        added = []
        for rid, fields in requests:
            agg = AsyncRequest(rid)
            agg.queue(**fields)
            self.members[rid] = agg
            added.append(agg)
        self._record(added)
        return added

    def start(self, worker: str, at: datetime) -> list[tuple[AsyncRequest, int]]:
        """A worker takes the lot: every request not ended gets a new attempt, or fails
        when its attempts are used up. ``(request, attempt)`` of those to run."""
        runs = []
        for agg in self.members.values():
            attempt = agg.start(worker, at)
            if attempt is not None:
                runs.append((agg, attempt))
        self._record(self.members.values())
        return runs

    def attempt_failed(
        self, request_id: str, attempt: int, error: str, *, final: bool, at: datetime
    ) -> bool:
        """:meth:`AsyncRequest.attempt_failed` of one request."""
        agg = self.member(request_id)
        again = agg.attempt_failed(attempt, error, final=final, at=at)
        self._record([agg])
        return again

    def complete(self, results: Sequence[tuple[str, int, dict[str, Any]]]) -> list[bool]:
        """:meth:`AsyncRequest.complete` of several requests, ``(request id, attempt,
        fields)`` each."""
        touched = [self.member(rid) for rid, _, _ in results]
        stored = [
            agg.complete(attempt, **fields)
            for agg, (_, attempt, fields) in zip(touched, results, strict=True)
        ]
        self._record(touched)
        return stored

    def cancel(self, request_id: str, by: str, at: datetime) -> None:
        """Cancels one queued request."""
        agg = self.member(request_id)
        agg.cancel(by, at)
        self._record([agg])

    def expire(self, at: datetime) -> None:
        """Expires every request of the lot (they share a retention period)."""
        for agg in self.members.values():
            agg.expire(at)
        self._record(self.members.values())

    def _record(self, touched: Iterable[AsyncRequest]) -> None:
        """Turns what the members decided (applied to them already) into lot events: one
        per kind of change, in the order of :data:`_LOT_EVENT` (the order of a request's
        changes within one decision: failed, then expired)."""
        by_kind: dict[type[DomainEvent], list[DomainEvent]] = {}
        for agg in touched:
            for change in agg.pending:
                item_cls, lot_cls = _LOT_EVENT[type(change)]
                item = item_cls.model_construct(request_id=agg.id, **dict(change))  # type: ignore[call-arg]
                by_kind.setdefault(lot_cls, []).append(item)
            agg.version += len(agg.pending)
            agg.pending = []
        for lot_cls in LOT_EVENTS:
            if lot_cls in by_kind:
                self.pending.append(lot_cls.model_construct(requests=by_kind[lot_cls]))  # type: ignore[call-arg]

    @property
    def expired(self) -> bool:
        """Whether every request's payload and result were removed."""
        return all(agg.expired for agg in self.members.values())

    # -- state -----------------------------------------------------------------------

    def apply(self, event: DomainEvent) -> None:
        """Changes the members' state from one lot event."""
        for rid, change in request_events(event):
            self._apply_to(rid, change)

    def _apply_to(self, request_id: str, change: DomainEvent) -> None:
        agg = self.members.get(request_id)
        if agg is None:
            agg = self.members[request_id] = AsyncRequest(request_id)
        agg.apply(change)
        agg.version += 1


class SingleRequest(AsyncLot):
    """A request accepted before lots: a lot of one on its ``async_request`` stream,
    whose events stay the per-request ones."""

    aggregate_type: ClassVar[str] = "async_request"

    def apply(self, event: DomainEvent) -> None:
        """Changes the one request's state."""
        self._apply_to(self.id, event)

    def _record(self, touched: Iterable[AsyncRequest]) -> None:
        for agg in touched:
            self.pending.extend(agg.pending)
            agg.version += len(agg.pending)
            agg.pending = []


def lot(lot_id: str) -> AsyncLot:
    """The aggregate of a lot id (a request from before lots: a :class:`SingleRequest`)."""
    if len(lot_id) == LOT_ID_LENGTH:
        return AsyncLot(lot_id)
    return SingleRequest(lot_id)
