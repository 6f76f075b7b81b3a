"""The AsyncLot aggregate: ids, one lot event per kind of change, decisions still taken
by each request, replay, and the lots of one that requests accepted before lots are."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shipyard_asyncinference.domain import EVENTS, AsyncLot, AsyncRequest, SingleRequest, lot
from shipyard_asyncinference.domain.events import (
    AsyncRequestCancelled,
    AsyncRequestCompleted,
    AsyncRequestQueued,
    AsyncRequestStarted,
)
from shipyard_asyncinference.domain.lots import (
    LOT_EVENTS,
    LOT_ID_LENGTH,
    AsyncLotCompleted,
    AsyncLotExpired,
    AsyncLotQueued,
    AsyncLotRequestsFailed,
    AsyncLotStarted,
    new_lot_id,
    new_request_id,
    request_events,
)
from shipyard_core.aggregate import DomainEvent
from shipyard_core.errors import NotFound
from shipyard_core.eventstore import StoredEvent

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HEX = re.compile(r"^[0-9a-f]+$")


def fields(max_attempts: int = 3, deployment: str = "echo") -> dict[str, Any]:
    """The fields of AsyncRequestQueued for one request."""
    return {
        "deployment": deployment,
        "group": "team-a",
        "caller": "ana",
        "protocol": "raw",
        "model_path": "/predict",
        "content_type": "application/json",
        "client_request_id": "",
        "payload_bytes": 2,
        "payload_sha256": "0" * 64,
        "payload_location": "inline",
        "max_attempts": max_attempts,
        "at": T0,
        "expires_at": T0 + timedelta(days=3),
    }


def result(at: datetime = T0) -> dict[str, Any]:
    """The fields of AsyncRequestCompleted but the attempt."""
    return {
        "status": 200,
        "content_type": "application/json",
        "result_bytes": 2,
        "result_sha256": "1" * 64,
        "result_location": "inline",
        "at": at,
    }


def queued_lot(*max_attempts: int) -> tuple[AsyncLot, list[str]]:
    """A new lot of one request per ``max_attempts`` given, and its request ids."""
    lot_id = new_lot_id()
    ids = [new_request_id() for _ in max_attempts]
    new = AsyncLot(lot_id)
    new.queue([(rid, fields(n)) for rid, n in zip(ids, max_attempts, strict=True)])
    return new, ids


def types(events: Sequence[DomainEvent]) -> list[str]:
    return [type(e).__name__ for e in events]


def items(event: DomainEvent) -> list[str]:
    """The request ids a lot event concerns, in order."""
    return [rid for rid, _ in request_events(event)]


def stored(aggregate: str, aggregate_id: str, events: Sequence[DomainEvent]) -> list[StoredEvent]:
    """Events as the store hands them back: JSON payloads, versions 1, 2, ..."""
    return [
        StoredEvent(
            service="asyncinference",
            event_id=uuid.uuid4(),
            stream_id=f"{aggregate}:{aggregate_id}",
            version=version,
            aggregate=aggregate,
            event_type=event.event_type(),
            schema_version=event.schema_version,
            payload=event.model_dump(mode="json"),
            metadata={},
            recorded_at=T0,
        )
        for version, event in enumerate(events, start=1)
    ]


def replay(found: AsyncLot, events: Sequence[StoredEvent]) -> AsyncLot:
    """What Repository.load does: decode and apply each stored event."""
    for event in events:
        found.apply(EVENTS.decode(event))
        found.version = event.version
    return found


def state(agg: AsyncRequest) -> dict[str, Any]:
    """A request's whole state (but its unsaved events)."""
    return {k: v for k, v in vars(agg).items() if k != "pending"}


# -- ids --------------------------------------------------------------------------------


def test_lot_and_request_ids() -> None:
    lots = {new_lot_id() for _ in range(200)}
    requests = {new_request_id() for _ in range(200)}
    assert len(lots) == len(requests) == 200
    for lot_id in lots:
        assert len(lot_id) == LOT_ID_LENGTH == 24 and HEX.match(lot_id), lot_id
    # A request id is a random UUID (a public deployment's result is read with it alone):
    # it tells nothing of its lot or its siblings.
    for rid in requests:
        assert uuid.UUID(rid).version == 4 and uuid.UUID(rid).hex == rid
    new, ids = queued_lot(3, 3)
    assert not any(rid.startswith(new.id) for rid in ids)
    assert len({rid[:24] for rid in ids}) == 2
    # The aggregate of an id: a lot's (24 digits), or a request's from before lots.
    old = uuid.uuid4().hex
    assert isinstance(lot(old), SingleRequest)
    assert type(lot(new.id)) is AsyncLot
    assert lot(old).aggregate_type == "async_request"
    assert lot(new.id).aggregate_type == "async_lot"


# -- decisions --------------------------------------------------------------------------


def test_queueing_n_requests_is_one_event() -> None:
    new, ids = queued_lot(3, 3, 3, 3, 3)
    assert types(new.pending) == ["AsyncLotQueued"]
    (event,) = new.pending
    assert isinstance(event, AsyncLotQueued)
    assert len(event.requests) == 5
    assert items(event) == ids
    # Each item is the request event it stands for.
    assert all(isinstance(item, AsyncRequestQueued) for _, item in request_events(event))
    assert [item.deployment for item in event.requests] == ["echo"] * 5
    # The members exist, queued, in submission order; the lot knows its deployment.
    assert list(new.members) == ids
    assert [agg.id for agg in new.members.values()] == ids
    assert all(new.member(rid).status == "queued" for rid in ids)
    assert all(new.member(rid).exists and not new.member(rid).pending for rid in ids)
    assert new.deployment == "echo"
    assert new.exists
    assert all(agg.expires_at == T0 + timedelta(days=3) for agg in new.members.values())
    with pytest.raises(NotFound):
        new.member(new_request_id())


def test_start_runs_what_can_run_and_fails_what_used_up_its_attempts() -> None:
    new, (spent, cancelled, again) = queued_lot(1, 3, 3)
    new.cancel(cancelled, "ana", T0)
    assert [(agg.id, n) for agg, n in new.start("w1", T0)] == [(spent, 1), (again, 1)]
    assert new.attempt_failed(again, 1, "boom", final=False, at=T0) is True
    new.pending.clear()

    # Redelivered after w1 died mid-"spent": its one attempt is used up; the cancelled
    # request is skipped; the other one gets its second attempt.
    runs = new.start("w2", T0 + timedelta(minutes=1))
    assert [(agg.id, n) for agg, n in runs] == [(again, 2)]
    assert runs[0][0] is new.member(again)
    assert sorted(types(new.pending)) == ["AsyncLotRequestsFailed", "AsyncLotStarted"]
    started = next(e for e in new.pending if isinstance(e, AsyncLotStarted))
    failed = next(e for e in new.pending if isinstance(e, AsyncLotRequestsFailed))
    assert items(started) == [again]
    assert started.requests[0].attempt == 2 and started.requests[0].worker == "w2"
    assert items(failed) == [spent]
    assert "stopped before it ended" in failed.requests[0].error
    assert new.member(spent).status == "failed"
    assert new.member(cancelled).status == "cancelled"
    assert new.member(again).status == "running" and new.member(again).attempts == 2

    # Once every request ended, a start decides nothing.
    new.pending.clear()
    assert new.complete([(again, 2, result())]) == [True]
    new.pending.clear()
    assert new.start("w3", T0) == []
    assert new.pending == []


def test_a_result_is_stored_once() -> None:
    new, (first, second) = queued_lot(3, 3)
    new.start("w", T0)
    new.pending.clear()
    assert new.complete([(first, 1, result()), (second, 1, result())]) == [True, True]
    assert types(new.pending) == ["AsyncLotCompleted"]
    (event,) = new.pending
    assert isinstance(event, AsyncLotCompleted)
    assert items(event) == [first, second]
    new.pending.clear()
    # Another worker's copy of the same attempts: nothing is stored, nothing emitted.
    assert new.complete([(first, 1, result()), (second, 1, result())]) == [False, False]
    assert new.pending == []
    assert new.member(first).status == "completed"
    # An attempt that is not the current one is refused alike.
    other, (rid,) = queued_lot(3)
    other.start("w1", T0)
    other.start("w2", T0)  # a redelivery while w1 still runs: attempt 2
    other.pending.clear()
    assert other.complete([(rid, 1, result())]) == [False]
    assert other.pending == []
    assert other.complete([(rid, 2, result())]) == [True]
    assert types(other.pending) == ["AsyncLotCompleted"]
    with pytest.raises(NotFound):
        other.complete([(new_request_id(), 1, result())])


def test_replaying_a_lots_events_gives_the_same_requests() -> None:
    new, ids = queued_lot(1, 2, 3, 3, 3)
    done, poison, retried, cancelled, stuck = ids
    saved: list[DomainEvent] = []

    def save() -> None:
        saved.extend(new.pending)
        new.pending.clear()

    save()
    new.cancel(cancelled, "ana", T0)
    save()
    new.start("w1", T0 + timedelta(seconds=1))
    save()
    new.complete([(done, 1, result(T0 + timedelta(seconds=2)))])
    save()
    new.attempt_failed(poison, 1, "the model answered 500", final=False, at=T0)
    new.attempt_failed(retried, 1, "timeout", final=False, at=T0)
    save()
    new.start("w2", T0 + timedelta(seconds=3))
    save()
    new.attempt_failed(poison, 2, "the model answered 500", final=False, at=T0)
    new.complete([(retried, 2, {**result(), "status": 201, "result_bytes": 7})])
    save()
    assert len(saved) >= 8
    assert {type(e) for e in saved} <= set(LOT_EVENTS)

    fresh = replay(AsyncLot(new.id), stored("async_lot", new.id, saved))
    assert fresh.version == len(saved)
    assert fresh.deployment == new.deployment == "echo"
    assert list(fresh.members) == ids
    for rid in ids:
        assert state(fresh.member(rid)) == state(new.member(rid)), rid
    statuses = {rid: fresh.member(rid).status for rid in ids}
    assert statuses == {
        done: "completed",
        poison: "failed",
        retried: "completed",
        cancelled: "cancelled",
        stuck: "running",
    }
    assert (
        fresh.member(poison).error == "gave up after 2 attempts; last error: the model answered 500"
    )
    assert fresh.member(retried).result_status == 201
    assert fresh.member(retried).result_bytes == 7
    assert fresh.member(stuck).attempts == 2
    assert fresh.member(retried).error == ""
    # The replayed lot decides as the original: the stuck request's result is stored once.
    assert fresh.complete([(stuck, 2, result())]) == [True]
    assert fresh.complete([(stuck, 2, result())]) == [False]


def test_expiry_fails_unfinished_requests_first_and_expires_all() -> None:
    new, (unfinished, done) = queued_lot(3, 3)
    new.start("w", T0)
    new.complete([(done, 1, result())])
    new.pending.clear()
    new.expire(T0 + timedelta(days=3))
    assert types(new.pending) == ["AsyncLotRequestsFailed", "AsyncLotExpired"]
    failed, expired = new.pending
    assert isinstance(failed, AsyncLotRequestsFailed) and isinstance(expired, AsyncLotExpired)
    assert items(failed) == [unfinished]
    assert items(expired) == [unfinished, done]
    assert "retention period" in new.member(unfinished).error
    assert new.member(unfinished).status == "failed"
    assert new.member(done).status == "completed"
    assert all(agg.expired for agg in new.members.values())
    assert new.expired
    new.pending.clear()
    new.expire(T0 + timedelta(days=4))
    assert new.pending == []  # once


def test_expiry_event_order_does_not_depend_on_the_member_order() -> None:
    """Each request's own changes must read failed, then expired, whichever member of the
    lot comes first: here the finished one does."""
    new, (done, unfinished) = queued_lot(3, 3)
    new.start("w", T0)
    new.complete([(done, 1, result())])
    new.pending.clear()
    new.expire(T0 + timedelta(days=3))
    assert new.member(unfinished).status == "failed" and new.expired
    # What a reader of the stream sees for the unfinished request, in order.
    history = [
        type(change).__mro__[1].__name__
        for event in new.pending
        for rid, change in request_events(event)
        if rid == unfinished
    ]
    assert history == ["AsyncRequestFailed", "AsyncRequestExpired"]
    assert types(new.pending) == ["AsyncLotRequestsFailed", "AsyncLotExpired"]


# -- requests accepted before lots ------------------------------------------------------


def test_a_request_from_before_lots_keeps_its_own_events() -> None:
    rid = uuid.uuid4().hex
    old: list[DomainEvent] = [
        AsyncRequestQueued(**fields(3)),
        AsyncRequestStarted(attempt=1, worker="old-worker", at=T0),
    ]
    single = lot(rid)
    assert isinstance(single, SingleRequest)
    replay(single, stored("async_request", rid, old))
    assert single.version == 2
    assert list(single.members) == [rid]
    agg = single.member(rid)
    assert agg.status == "running" and agg.attempts == 1
    assert single.deployment == "echo"

    assert single.complete([(rid, 1, result())]) == [True]
    assert types(single.pending) == ["AsyncRequestCompleted"]
    assert isinstance(single.pending[0], AsyncRequestCompleted)
    assert not isinstance(single.pending[0], tuple(LOT_EVENTS))
    assert single.complete([(rid, 1, result())]) == [False]
    assert types(single.pending) == ["AsyncRequestCompleted"]

    # Its other decisions too: a new attempt, a cancel.
    again = replay(lot(rid), stored("async_request", rid, old))
    assert [(a.id, n) for a, n in again.start("w", T0)] == [(rid, 2)]
    assert types(again.pending) == ["AsyncRequestStarted"]
    waiting = replay(lot(rid), stored("async_request", rid, old[:1]))
    waiting.cancel(rid, "ana", T0)
    assert types(waiting.pending) == ["AsyncRequestCancelled"]
    assert isinstance(waiting.pending[0], AsyncRequestCancelled)
    waiting.pending.clear()
    waiting.expire(T0)
    assert types(waiting.pending) == ["AsyncRequestExpired"]
    # And they replay on its own stream as before.
    saved = [*old, *single.pending]
    fresh = replay(lot(rid), stored("async_request", rid, saved))
    assert state(fresh.member(rid)) == state(single.member(rid))
    assert fresh.member(rid).status == "completed"
