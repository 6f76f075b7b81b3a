"""Command handlers: submit, cancel, and the worker's start / complete / fail, expiry.

Each one loads the requests' lot, lets its requests decide, and appends the lot's events
with the optimistic concurrency check (plus, in the same statement, small payloads or
results). A worker that lost a race (another one completed the request, or it was
cancelled) changes nothing: a result is written once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from nats.js import JetStreamContext

from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.app.membership import Membership
from shipyard_asyncinference.app.payloads import PAYLOAD, RESULT, Blobs
from shipyard_asyncinference.app.views import RequestView, Submission
from shipyard_asyncinference.domain import EVENTS, INLINE, AsyncLot, AsyncRequest, lot
from shipyard_asyncinference.domain.lots import MAX_LOT_SIZE, new_lot_id, new_request_id
from shipyard_core.aggregate import Repository, retry_on_conflict
from shipyard_core.auth import Principal
from shipyard_core.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShipyardError,
    Unavailable,
)
from shipyard_core.eventstore import EventStore, OutboxMessage
from shipyard_core.validation import deployment_name

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
_MODEL_PATH = re.compile(r"^/[A-Za-z0-9._~:/@%+-]{0,500}$")

Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(UTC)


def check_request_id(request_id: str) -> str:
    """A request id is 32 lower-case hex digits; anything else cannot exist."""
    if not _REQUEST_ID.match(request_id):
        raise NotFound(f"async request {request_id[:64]!r} does not exist")
    return request_id


@dataclass(frozen=True)
class Started:
    """A request a worker started: its lot, its state, the attempt, its payload if
    inline."""

    lot: AsyncLot
    request: AsyncRequest
    attempt: int
    inline_payload: bytes | None = None


@dataclass(frozen=True)
class Result:
    """A model's answer to a started attempt, to store."""

    lot_id: str
    request: AsyncRequest
    attempt: int
    status: int
    content_type: str
    body: bytes


def payload_too_large(size: int, limit: int) -> ResourceExhausted:
    """The refusal of a payload over ``max_payload_bytes``."""
    return ResourceExhausted(
        f"the payload is {size} bytes; async requests take at most {limit} bytes "
        "(SHIPYARD_MAX_PAYLOAD_BYTES): send a smaller one, or use a batch job over an "
        "object store prefix"
    )


T = TypeVar("T")


class AsyncCommands:
    """The write side of async requests."""

    def __init__(
        self,
        store: EventStore,
        blobs: Blobs,
        js: JetStreamContext | None = None,
        *,
        max_payload_bytes: int,
        max_attempts: int,
        retention_seconds: float,
        clock: Clock = _now,
    ) -> None:
        self.store = store
        self.pool = store.pool
        self.repo: Repository[AsyncLot] = Repository(store, lot, EVENTS)
        self.blobs = blobs
        self.membership = Membership(blobs.schema)
        self.js = js
        self.max_payload_bytes = max_payload_bytes
        self.max_attempts = max_attempts
        self.retention = timedelta(seconds=retention_seconds)
        self.clock = clock

    async def load(self, request_id: str) -> AsyncRequest:
        """The request (NotFound when it does not exist)."""
        agg = (await self._load(check_request_id(request_id)))[1]
        if agg is None:
            raise NotFound(f"async request {request_id!r} does not exist")
        return agg

    async def _load(self, request_id: str) -> tuple[AsyncLot, AsyncRequest | None]:
        async with self.pool.acquire() as conn:
            lot_id = (await self.membership.lots_of(conn, [request_id]))[request_id]
            found = await self.repo.load(lot_id, conn=conn)
        return found, found.members.get(request_id)

    async def lots_of(self, request_ids: Sequence[str]) -> dict[str, str]:
        """The lot of each request (see :class:`Membership`)."""
        async with self.pool.acquire() as conn:
            return await self.membership.lots_of(conn, request_ids)

    # -- callers ---------------------------------------------------------------------

    async def submit(self, caller: Principal, sub: Submission) -> RequestView:
        """Stores and queues a request (the gateway's call, internal only). Once this
        returns, the request is in PostgreSQL and will run even if every process dies."""
        outcome = (await self.submit_many(caller, [sub]))[0]
        if isinstance(outcome, ShipyardError):
            raise outcome
        return outcome

    def _check(self, sub: Submission) -> None:
        deployment_name("deployment", sub.deployment)
        if not sub.group:
            raise InvalidArgument("group", "is required", "the deployment's group")
        if not _MODEL_PATH.match(sub.model_path):
            raise InvalidArgument(
                "model_path", f"{sub.model_path[:80]!r} is not a model server path", "/predict"
            )
        if len(sub.body) > self.max_payload_bytes:
            raise payload_too_large(len(sub.body), self.max_payload_bytes)

    async def submit_many(
        self, caller: Principal, subs: Sequence[Submission]
    ) -> list[RequestView | ShipyardError]:
        """:meth:`submit` for several requests in one statement (the gateway coalesces
        concurrent submissions): one lot per deployment, one queue message per lot. Each
        request is accepted (its view) or refused (the error a submit of it alone raises;
        a large payload the object store does not take is refused alone, Unavailable). A
        database outage fails the whole call: none is accepted."""
        caller.require_internal("submit an async request (the gateway does)")
        slots: list[str | ShipyardError] = []
        by_deployment: dict[str, list[tuple[str, Submission]]] = {}
        for sub in subs:
            try:
                self._check(sub)
            except ShipyardError as exc:
                slots.append(exc)
                continue
            rid = new_request_id()
            by_deployment.setdefault(sub.deployment, []).append((rid, sub))
            slots.append(rid)
        accepted = [pair for members in by_deployment.values() for pair in members]
        if not accepted:
            return [s for s in slots if isinstance(s, ShipyardError)]
        locations = await asyncio.gather(
            *(self.blobs.stage(rid, PAYLOAD, sub.body) for rid, sub in accepted),
            return_exceptions=True,
        )
        staged: dict[str, str] = {}
        for (rid, _), location in zip(accepted, locations, strict=True):
            if isinstance(location, BaseException):
                # A large payload the object store did not take: refused alone, the
                # others of the call go on.
                log.warning("async request %s: cannot stage its payload: %s", rid, location)
                slots[slots.index(rid)] = Unavailable(
                    "the object store for large payloads is unavailable; retry shortly"
                )
            else:
                staged[rid] = location
        now = self.clock()
        lots: list[AsyncLot] = []
        bodies: list[tuple[str, str, bytes]] = []
        for members in by_deployment.values():
            kept = [(rid, sub) for rid, sub in members if rid in staged]
            for start in range(0, len(kept), MAX_LOT_SIZE):
                part = kept[start : start + MAX_LOT_SIZE]
                new = AsyncLot(new_lot_id())
                new.queue([(rid, self._queued(sub, staged[rid], now)) for rid, sub in part])
                lots.append(new)
                bodies.extend((rid, staged[rid], sub.body) for rid, sub in part)
        try:
            # One statement: payload rows, events and work items commit together (the
            # work items leave through the outbox: on the queue once committed, whatever
            # crashes; decision 0033), in one round trip (decision 0034).
            await self.repo.save(
                *lots,
                rows=[
                    *self.blobs.inline_rows(PAYLOAD, bodies),
                    *(self.membership.rows(new.id, list(new.members)) for new in lots),
                ],
                messages=[
                    OutboxMessage(
                        queue.subject(new.deployment, new.id),
                        queue.message(new.id, list(new.members)),
                        _message_id(new.id),
                    )
                    for new in lots
                ],
                metadata_of={new.id: _lot_metadata(new) for new in lots},
            )
        except BaseException:
            for location in locations:
                if isinstance(location, str):
                    await self.blobs.discard(location)
            raise
        if self.js is not None and lots:
            # And at once, under the same message ids (JetStream keeps one): the relay's
            # copy waits for its wake-up and for older transactions to end, milliseconds
            # a queued request would spend idle.
            sent = await asyncio.gather(
                *(
                    queue.enqueue(
                        self.js, new.id, new.deployment, str(_message_id(new.id)), list(new.members)
                    )
                    for new in lots
                ),
                return_exceptions=True,
            )
            failed = [r for r in sent if isinstance(r, BaseException)]
            if failed:  # the relay's copies will do
                log.warning("%d fast queue publishes failed (%s)", len(failed), failed[0])
        members_of = {rid: agg for new in lots for rid, agg in new.members.items()}
        return [s if isinstance(s, ShipyardError) else RequestView.of(members_of[s]) for s in slots]

    def _queued(self, sub: Submission, location: str, now: datetime) -> dict[str, Any]:
        return {
            "deployment": sub.deployment,
            "group": sub.group,
            "caller": sub.caller,
            "protocol": sub.protocol,
            "model_path": sub.model_path,
            "content_type": sub.content_type or "application/json",
            "client_request_id": sub.client_request_id[:128],
            "payload_bytes": len(sub.body),
            "payload_sha256": hashlib.sha256(sub.body).hexdigest(),
            "payload_location": location,
            "max_attempts": self.max_attempts,
            "at": now,
            "expires_at": now + self.retention,
        }

    async def cancel(self, caller: Principal, deployment: str, request_id: str) -> RequestView:
        """Cancels a queued request (FailedPrecondition once it runs or ended)."""

        async def attempt() -> RequestView:
            found, agg = await self._visible(caller, deployment, request_id)
            found.cancel(agg.id, caller.user, self.clock())
            await self.repo.save(found, actor=caller.user)
            return RequestView.of(agg)

        return await retry_on_conflict(attempt)

    async def visible(self, caller: Principal, deployment: str, request_id: str) -> AsyncRequest:
        """The request if ``caller`` may see it and it belongs to ``deployment``; else
        NotFound (whether it exists is not the caller's business)."""
        return (await self._visible(caller, deployment, request_id))[1]

    async def _visible(
        self, caller: Principal, deployment: str, request_id: str
    ) -> tuple[AsyncLot, AsyncRequest]:
        if _REQUEST_ID.match(request_id):
            found, agg = await self._load(request_id)
            if (
                agg is not None
                and agg.deployment == deployment
                and (caller.internal or caller.can_see(agg.group))
            ):
                return found, agg
        raise NotFound(
            f"async request {request_id[:64]!r} of deployment {deployment[:64]!r} does not exist"
        )

    # -- workers ---------------------------------------------------------------------

    async def start_many(
        self, lots: Sequence[tuple[str, Sequence[str]]], worker: str
    ) -> list[list[Started]]:
        """Starts every lot of ``(lot id, its request ids)`` (ids may be unknown: empty)
        in one statement: each of its requests not ended gets a new attempt (or fails,
        its attempts used up); per lot, the requests to run. The inline payloads of the
        ids given are read meanwhile, on another connection: a round trip less before
        the model calls. The lot ids must be distinct."""
        known = [rid for _, ids in lots for rid in ids]
        payloads = asyncio.ensure_future(self._inline_payloads(known))

        async def attempt() -> list[tuple[AsyncLot, list[tuple[AsyncRequest, int]]]]:
            async with self.pool.acquire() as conn:
                found = await self.repo.load_many([lot_id for lot_id, _ in lots], conn=conn)
                now = self.clock()
                runs = [one.start(worker, now) for one in found]
                changed = [one for one in found if one.pending]
                if changed:
                    await self.repo.save(*changed, conn=conn, actor=worker)
            return list(zip(found, runs, strict=True))

        try:
            started = await retry_on_conflict(attempt)
            inline = await payloads
        finally:
            if not payloads.done():
                payloads.cancel()
            elif not payloads.cancelled():
                payloads.exception()  # retrieved: the error that matters is raised above
        return [
            [Started(one, agg, number, inline.get(agg.id)) for agg, number in runs]
            for one, runs in started
        ]

    async def _inline_payloads(self, request_ids: Sequence[str]) -> dict[str, bytes]:
        if not request_ids:
            return {}
        async with self.pool.acquire() as conn:
            return await self.blobs.read_inline_many(conn, request_ids, PAYLOAD)

    async def payload(self, started: Started) -> bytes:
        """The payload of a started request (read with it when inline)."""
        agg = started.request
        if started.inline_payload is not None and agg.payload_location == INLINE:
            return started.inline_payload
        async with self.pool.acquire() as conn:
            return await self.blobs.read(conn, agg.id, PAYLOAD, agg.payload_location)

    async def _decide(
        self,
        lots: dict[str, AsyncLot],
        lot_ids: Sequence[str],
        decide: Callable[[list[AsyncLot]], tuple[T, list[tuple[str, str, bytes]]]],
        worker: str,
    ) -> T:
        """Lets ``decide`` change the lots ``lot_ids`` and saves them in one statement,
        with the inline results ``decide`` returns. It is tried first on the lots as the
        worker holds them in ``lots`` (the usual case: nothing happened since); after a
        concurrency conflict they are loaded again and ``decide`` runs anew
        (:func:`retry_on_conflict`). ``lots`` is kept current either way."""
        fresh = False

        async def attempt() -> T:
            nonlocal fresh
            missing = lot_ids if fresh else [i for i in lot_ids if i not in lots]
            if missing:
                for one in await self.repo.load_many(missing):
                    lots[one.id] = one
            fresh = True
            current = [lots[lot_id] for lot_id in lot_ids]
            value, rows = decide(current)
            changed = [one for one in current if one.pending]
            if changed:
                try:
                    await self.repo.save(
                        *changed, rows=self.blobs.inline_rows(RESULT, rows), actor=worker
                    )
                except BaseException:
                    for one in changed:  # its requests decided what was not saved
                        lots.pop(one.id, None)
                    raise
            return value

        return await retry_on_conflict(attempt)

    async def complete_many(
        self, lots: dict[str, AsyncLot], results: Sequence[Result], worker: str
    ) -> list[bool | None]:
        """Stores the result of each attempt, in one statement; False for one that was
        not its attempt's to store (the request moved on): nothing is written for it;
        None for one whose large result could not be put in the object store (the
        caller leaves it to run again). ``lots`` holds the results' lots as the worker
        knows them (see :meth:`_decide`)."""
        staged = await asyncio.gather(
            *(self.blobs.stage(r.request.id, RESULT, r.body, r.attempt) for r in results),
            return_exceptions=True,
        )
        outcome: list[bool | None] = [None] * len(results)
        usable: list[tuple[int, Result, str, str]] = []
        for i, (result, location) in enumerate(zip(results, staged, strict=True)):
            if isinstance(location, BaseException):
                log.warning(
                    "async request %s: cannot stage its result: %s", result.request.id, location
                )
            else:
                digest = hashlib.sha256(result.body).hexdigest()
                usable.append((i, result, location, digest))
        lot_ids = list(dict.fromkeys(r.lot_id for _, r, _, _ in usable))
        kept: set[str] = set()

        def decide(current: list[AsyncLot]) -> tuple[list[bool], list[tuple[str, str, bytes]]]:
            nonlocal kept
            now = self.clock()
            stored: dict[int, bool] = {}
            for one in current:
                mine = [u for u in usable if u[1].lot_id == one.id]
                oks = one.complete(
                    [
                        (
                            r.request.id,
                            r.attempt,
                            {
                                "status": r.status,
                                "content_type": r.content_type,
                                "result_bytes": len(r.body),
                                "result_sha256": digest,
                                "result_location": location,
                                "at": now,
                            },
                        )
                        for _, r, location, digest in mine
                    ]
                )
                stored.update((i, ok) for (i, _, _, _), ok in zip(mine, oks, strict=True))
            rows = [(r.request.id, loc, r.body) for i, r, loc, _ in usable if stored[i]]
            kept = {location for _, location, _ in rows}
            return [stored[i] for i, _, _, _ in usable], rows

        try:
            stored = await self._decide(lots, lot_ids, decide, worker) if usable else []
        finally:
            for location in staged:
                if isinstance(location, str) and location not in kept:
                    await self.blobs.discard(location)
        for (i, _, _, _), ok in zip(usable, stored, strict=True):
            outcome[i] = ok
        return outcome

    async def fail_attempt(
        self,
        lots: dict[str, AsyncLot],
        lot_id: str,
        request: AsyncRequest,
        attempt: int,
        error: str,
        *,
        final: bool,
        worker: str,
    ) -> bool:
        """Records a failed attempt; True when the request is queued for another."""

        def decide(current: list[AsyncLot]) -> tuple[bool, list[tuple[str, str, bytes]]]:
            again = current[0].attempt_failed(
                request.id, attempt, error[:2000], final=final, at=self.clock()
            )
            return again, []

        return await self._decide(lots, [lot_id], decide, worker)

    async def expire(self, lot_id: str) -> bool:
        """Removes the payloads and results of a lot past its retention; False when it
        was expired already."""

        async def decide() -> bool:
            found = await self.repo.load(lot_id)
            if not found.members or found.expired:
                return False
            found.expire(self.clock())
            locations = [
                location
                for agg in found.members.values()
                for location in (agg.payload_location, agg.result_location)
                if location and location != INLINE
            ]
            async with self.pool.acquire() as conn, conn.transaction():
                await self.repo.save(found, conn=conn, actor="sweeper")
                await self.blobs.remove(conn, list(found.members), locations)
            return True

        return await retry_on_conflict(decide)


def _message_id(lot_id: str) -> uuid.UUID:
    """The queue message id of a lot (its id, padded to a UUID)."""
    return uuid.UUID(lot_id.ljust(32, "0"))


def _lot_metadata(new: AsyncLot) -> dict[str, Any]:
    """A new lot's event metadata: its callers (one, or the gateway's coalescing) and a
    correlation id (its first request's: for a lot of one, the request's own)."""
    callers = {agg.caller for agg in new.members.values()}
    actor = callers.pop() if len(callers) == 1 else "gateway"
    first = next(iter(new.members))
    return {"actor": actor or "anonymous", "correlation_id": str(uuid.UUID(first))}
