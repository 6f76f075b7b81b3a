"""Command handlers: submit, cancel, and the worker's start / complete / fail, expiry.

Each one loads the request, lets the aggregate decide, and appends its events with the
optimistic concurrency check (plus, in the same transaction, a small payload or result).
A worker that lost a race (another one completed the request, or it was cancelled)
changes nothing: a result is written once.
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

from nats.js import JetStreamContext

from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.app.payloads import PAYLOAD, RESULT, Blobs
from shipyard_asyncinference.app.views import RequestView, Submission
from shipyard_asyncinference.domain import EVENTS, INLINE, AsyncRequest
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
    """A request a worker started: its state, the attempt, its payload if inline."""

    request: AsyncRequest
    attempt: int
    inline_payload: bytes | None = None


@dataclass(frozen=True)
class Result:
    """A model's answer to a started attempt, to store."""

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
        self.repo: Repository[AsyncRequest] = Repository(store, AsyncRequest, EVENTS)
        self.blobs = blobs
        self.js = js
        self.max_payload_bytes = max_payload_bytes
        self.max_attempts = max_attempts
        self.retention = timedelta(seconds=retention_seconds)
        self.clock = clock

    async def load(self, request_id: str) -> AsyncRequest:
        """The request (NotFound when it does not exist)."""
        agg = await self.repo.load(check_request_id(request_id))
        if not agg.exists:
            raise NotFound(f"async request {request_id!r} does not exist")
        return agg

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
        """:meth:`submit` for several requests in one transaction (the gateway coalesces
        concurrent submissions): each is accepted (its view) or refused (the error a
        submit of it alone raises; a large payload the object store does not take is
        refused alone, Unavailable). A database outage fails the whole call: none is
        accepted."""
        caller.require_internal("submit an async request (the gateway does)")
        slots: list[AsyncRequest | ShipyardError] = []
        accepted: list[tuple[AsyncRequest, Submission]] = []
        now = self.clock()
        for sub in subs:
            try:
                self._check(sub)
            except ShipyardError as exc:
                slots.append(exc)
                continue
            agg = AsyncRequest(uuid.uuid4().hex)
            accepted.append((agg, sub))
            slots.append(agg)
        if not accepted:
            return [s for s in slots if isinstance(s, ShipyardError)]
        locations = await asyncio.gather(
            *(self.blobs.stage(agg.id, PAYLOAD, sub.body) for agg, sub in accepted),
            return_exceptions=True,
        )
        staged: list[tuple[AsyncRequest, Submission, str]] = []
        for (agg, sub), location in zip(accepted, locations, strict=True):
            if isinstance(location, BaseException):
                # A large payload the object store did not take: refused alone, the
                # others of the call go on.
                log.warning("async request %s: cannot stage its payload: %s", agg.id, location)
                slots[slots.index(agg)] = Unavailable(
                    "the object store for large payloads is unavailable; retry shortly"
                )
            else:
                staged.append((agg, sub, location))
        accepted = [(agg, sub) for agg, sub, _ in staged]
        try:
            for agg, sub, location in staged:
                agg.queue(
                    deployment=sub.deployment,
                    group=sub.group,
                    caller=sub.caller,
                    protocol=sub.protocol,
                    model_path=sub.model_path,
                    content_type=sub.content_type or "application/json",
                    client_request_id=sub.client_request_id[:128],
                    payload_bytes=len(sub.body),
                    payload_sha256=hashlib.sha256(sub.body).hexdigest(),
                    payload_location=location,
                    max_attempts=self.max_attempts,
                    at=now,
                    expires_at=now + self.retention,
                )
            # One statement: payload rows, events and work items commit together (the
            # work items leave through the outbox: on the queue once committed, whatever
            # crashes; decision 0033), in one round trip (decision 0034).
            await self.repo.save(
                *(agg for agg, _ in accepted),
                rows=self.blobs.inline_rows(
                    PAYLOAD, [(agg.id, agg.payload_location, sub.body) for agg, sub in accepted]
                ),
                messages=[
                    OutboxMessage(
                        queue.subject(agg.deployment, agg.id),
                        queue.message(agg.id),
                        uuid.UUID(agg.id),
                    )
                    for agg, _ in accepted
                ],
                # Each request its own actor and correlation id (the call carries many).
                metadata_of={
                    agg.id: {
                        "actor": sub.caller or "anonymous",
                        "correlation_id": str(uuid.UUID(agg.id)),
                    }
                    for agg, sub in accepted
                },
            )
        except BaseException:
            for location in locations:
                if isinstance(location, str):
                    await self.blobs.discard(location)
            raise
        if self.js is not None and accepted:
            # And at once, under the same message ids (JetStream keeps one): the relay's
            # copy waits for its wake-up and for older transactions to end, milliseconds
            # a queued request would spend idle.
            sent = await asyncio.gather(
                *(
                    queue.enqueue(self.js, agg.id, agg.deployment, str(uuid.UUID(agg.id)))
                    for agg, _ in accepted
                ),
                return_exceptions=True,
            )
            failed = [r for r in sent if isinstance(r, BaseException)]
            if failed:  # the relay's copies will do
                log.warning("%d fast queue publishes failed (%s)", len(failed), failed[0])
        return [s if isinstance(s, ShipyardError) else RequestView.of(s) for s in slots]

    async def cancel(self, caller: Principal, deployment: str, request_id: str) -> RequestView:
        """Cancels a queued request (FailedPrecondition once it runs or ended)."""

        async def attempt() -> RequestView:
            agg = await self.visible(caller, deployment, request_id)
            agg.cancel(caller.user, self.clock())
            await self.repo.save(agg, actor=caller.user)
            return RequestView.of(agg)

        return await retry_on_conflict(attempt)

    async def visible(self, caller: Principal, deployment: str, request_id: str) -> AsyncRequest:
        """The request if ``caller`` may see it and it belongs to ``deployment``; else
        NotFound (whether it exists is not the caller's business)."""
        try:
            agg = await self.load(request_id)
        except NotFound:
            agg = None
        if (
            agg is None
            or agg.deployment != deployment
            or not (caller.internal or caller.can_see(agg.group))
        ):
            raise NotFound(
                f"async request {request_id[:64]!r} of deployment {deployment[:64]!r} "
                "does not exist"
            )
        return agg

    # -- workers ---------------------------------------------------------------------

    async def start_many(self, request_ids: Sequence[str], worker: str) -> list[Started | None]:
        """Marks each request running (a new attempt) in one transaction; None for one
        with nothing to run (ended, given up, or unknown). The inline payloads are read
        meanwhile, on another connection: a round trip less before the model call.
        ``request_ids`` must be distinct."""
        payloads = asyncio.ensure_future(self._inline_payloads(request_ids))

        async def attempt() -> list[Started | None]:
            async with self.pool.acquire() as conn:
                aggs = await self.repo.load_many(request_ids, conn=conn)
                now = self.clock()
                numbers = [agg.start(worker, now) for agg in aggs]
                changed = [agg for agg in aggs if agg.pending]
                if changed:
                    await self.repo.save(*changed, conn=conn, actor=worker)
            return [
                None if number is None else Started(agg, number)
                for agg, number in zip(aggs, numbers, strict=True)
            ]

        try:
            started = await retry_on_conflict(attempt)
            inline = await payloads
        finally:
            if not payloads.done():
                payloads.cancel()
            elif not payloads.cancelled():
                payloads.exception()  # retrieved: the error that matters is raised above
        return [
            None if s is None else Started(s.request, s.attempt, inline.get(s.request.id))
            for s in started
        ]

    async def _inline_payloads(self, request_ids: Sequence[str]) -> dict[str, bytes]:
        async with self.pool.acquire() as conn:
            return await self.blobs.read_inline_many(conn, request_ids, PAYLOAD)

    async def payload(self, started: Started) -> bytes:
        """The payload of a started request (read with it when inline)."""
        agg = started.request
        if started.inline_payload is not None and agg.payload_location == INLINE:
            return started.inline_payload
        async with self.pool.acquire() as conn:
            return await self.blobs.read(conn, agg.id, PAYLOAD, agg.payload_location)

    async def complete_many(self, results: Sequence[Result], worker: str) -> list[bool | None]:
        """Stores the result of each attempt, in one statement; False for one that was
        not its attempt's to store (the request moved on): nothing is written for it;
        None for one whose large result could not be put in the object store (the
        caller leaves it to run again). Each ``Result.request`` is the request as the
        worker started it, tried first (the usual case: nothing happened since); the
        concurrency check catches it when something did, and then all are loaded again
        and decided anew (:func:`retry_on_conflict`; then the messages are redelivered)."""
        staged = await asyncio.gather(
            *(self.blobs.stage(r.request.id, RESULT, r.body, r.attempt) for r in results),
            return_exceptions=True,
        )
        outcome: list[bool | None] = [None] * len(results)
        usable: list[tuple[int, Result, str]] = []
        for i, (result, location) in enumerate(zip(results, staged, strict=True)):
            if isinstance(location, BaseException):
                log.warning(
                    "async request %s: cannot stage its result: %s", result.request.id, location
                )
            else:
                usable.append((i, result, location))
        kept: set[str] = set()
        digests = [hashlib.sha256(r.body).hexdigest() for _, r, _ in usable]
        aggs = [result.request for _, result, _ in usable]
        first = True

        async def decide() -> list[bool]:
            nonlocal aggs, first, kept
            if not first:  # someone else moved one of them: load them all again
                aggs = await self.repo.load_many([r.request.id for _, r, _ in usable])
            first = False
            now = self.clock()
            stored = [
                agg.complete(
                    r.attempt,
                    status=r.status,
                    content_type=r.content_type,
                    result_bytes=len(r.body),
                    result_sha256=digest,
                    result_location=location,
                    at=now,
                )
                for agg, (_, r, location), digest in zip(aggs, usable, digests, strict=True)
            ]
            rows = [
                (r.request.id, location, r.body)
                for (_, r, location), ok in zip(usable, stored, strict=True)
                if ok
            ]
            if rows:
                await self.repo.save(*aggs, rows=self.blobs.inline_rows(RESULT, rows), actor=worker)
            kept = {location for _, location, _ in rows}
            return stored

        try:
            stored = await retry_on_conflict(decide)
        finally:
            for location in staged:
                if isinstance(location, str) and location not in kept:
                    await self.blobs.discard(location)
        for (i, _, _), ok in zip(usable, stored, strict=True):
            outcome[i] = ok
        return outcome

    async def fail_attempt(
        self, request_id: str, attempt: int, error: str, *, final: bool, worker: str
    ) -> bool:
        """Records a failed attempt; True when the request is queued for another."""

        async def decide() -> bool:
            agg = await self.repo.load(request_id)
            again = agg.attempt_failed(attempt, error[:2000], final=final, at=self.clock())
            if agg.pending:
                await self.repo.save(agg, actor=worker)
            return again

        return await retry_on_conflict(decide)

    async def expire(self, request_id: str) -> bool:
        """Removes payload and result of a request past its retention; False when it
        was expired already."""

        async def decide() -> bool:
            agg = await self.repo.load(request_id)
            if not agg.exists or agg.expired:
                return False
            agg.expire(self.clock())
            locations = [agg.payload_location]
            if agg.result_location:
                locations.append(agg.result_location)
            async with self.pool.acquire() as conn, conn.transaction():
                await self.repo.save(agg, conn=conn, actor="sweeper")
                await self.blobs.remove(
                    conn, request_id, [loc for loc in locations if loc != INLINE]
                )
            return True

        return await retry_on_conflict(decide)
