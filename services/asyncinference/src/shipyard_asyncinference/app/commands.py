"""Command handlers: submit, cancel, and the worker's start / complete / fail, expiry.

Each one loads the request, lets the aggregate decide, and appends its events with the
optimistic concurrency check (plus, in the same transaction, a small payload or result).
A worker that lost a race (another one completed the request, or it was cancelled)
changes nothing: a result is written once.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
from nats.js import JetStreamContext

from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.app.payloads import PAYLOAD, RESULT, Blobs
from shipyard_asyncinference.app.views import RequestView, Submission
from shipyard_asyncinference.domain import EVENTS, INLINE, AsyncRequest
from shipyard_core.aggregate import Repository, retry_on_conflict
from shipyard_core.auth import Principal
from shipyard_core.errors import ConcurrencyError, InvalidArgument, NotFound, ResourceExhausted
from shipyard_core.eventstore import EventStore
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
        caller.require_internal("submit an async request (the gateway does)")
        deployment_name("deployment", sub.deployment)
        if not sub.group:
            raise InvalidArgument("group", "is required", "the deployment's group")
        if not _MODEL_PATH.match(sub.model_path):
            raise InvalidArgument(
                "model_path", f"{sub.model_path[:80]!r} is not a model server path", "/predict"
            )
        if len(sub.body) > self.max_payload_bytes:
            raise payload_too_large(len(sub.body), self.max_payload_bytes)
        request_id = uuid.uuid4().hex
        now = self.clock()
        location = await self.blobs.stage(request_id, PAYLOAD, sub.body)
        agg = AsyncRequest(request_id)
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
        message_id = uuid.UUID(request_id)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await self.blobs.write_inline(conn, request_id, PAYLOAD, location, sub.body)
                await self.repo.save(agg, conn=conn, actor=sub.caller or "anonymous")
                # The work item leaves through the outbox with the event: on the queue
                # once committed, whatever crashes (decision 0033).
                await self.store.send_after_commit(
                    conn,
                    queue.subject(sub.deployment, request_id),
                    queue.message(request_id),
                    message_id,
                )
        except BaseException:
            await self.blobs.discard(location)
            raise
        if self.js is not None:
            # And at once, under the same message id (JetStream keeps one): the relay's
            # copy waits for its wake-up and for older transactions to end, milliseconds
            # a queued request would spend idle.
            try:
                await queue.enqueue(self.js, request_id, sub.deployment, str(message_id))
            except Exception as exc:  # the relay's copy will do
                log.warning("async request %s: fast queue publish failed (%s)", request_id, exc)
        return RequestView.of(agg)

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

    async def start(self, request_id: str, worker: str) -> tuple[AsyncRequest, int] | None:
        """Marks the request running (a new attempt); None when there is nothing to run."""

        async def attempt() -> tuple[AsyncRequest, int] | None:
            agg = await self.repo.load(request_id)
            number = agg.start(worker, self.clock())
            if agg.pending:
                await self.repo.save(agg, actor=worker)
            return None if number is None else (agg, number)

        return await retry_on_conflict(attempt)

    async def inline_payload(self, request_id: str) -> bytes | None:
        """The request's payload if it is stored inline, else None: read by the worker
        while it records the attempt, which saves a round trip before the model call."""
        async with self.pool.acquire() as conn:
            return await self.blobs.read_inline(conn, request_id, PAYLOAD)

    async def payload(self, agg: AsyncRequest, prefetched: bytes | None = None) -> bytes:
        """The request's payload (``prefetched``: what :meth:`inline_payload` read)."""
        if prefetched is not None and agg.payload_location == INLINE:
            return prefetched
        async with self.pool.acquire() as conn:
            return await self.blobs.read(conn, agg.id, PAYLOAD, agg.payload_location)

    async def complete(
        self,
        request_id: str,
        attempt: int,
        status: int,
        content_type: str,
        body: bytes,
        worker: str,
        agg: AsyncRequest | None = None,
    ) -> bool:
        """Stores the result of ``attempt``; False when it was not this attempt's to
        store (the request moved on): then nothing is written. ``agg``: the request as
        the worker started it, tried first (the usual case: nothing happened since);
        the concurrency check catches it when something did."""
        location = await self.blobs.stage(request_id, RESULT, body, attempt)
        stored = False
        try:
            while True:
                if agg is None:
                    agg = await self.repo.load(request_id)
                if not agg.complete(
                    attempt,
                    status=status,
                    content_type=content_type,
                    result_bytes=len(body),
                    result_sha256=hashlib.sha256(body).hexdigest(),
                    result_location=location,
                    at=self.clock(),
                ):
                    return False
                try:
                    async with self.pool.acquire() as conn, conn.transaction():
                        await self.blobs.write_inline(conn, request_id, RESULT, location, body)
                        await self.repo.save(agg, conn=conn, actor=worker)
                except (ConcurrencyError, asyncpg.UniqueViolationError):
                    agg = None
                    continue  # reload: someone else moved it; decide again
                stored = True
                return True
        finally:
            if not stored:
                await self.blobs.discard(location)

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
