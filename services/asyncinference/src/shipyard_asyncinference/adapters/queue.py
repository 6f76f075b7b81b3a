"""The work queue: JetStream stream ``ASYNC`` (work-queue retention), subjects
``async.requests.<deployment>.<lot id>``, one message per lot of requests to run
(body: its id and its requests' ids, ``{"lot_id", "requests": [...]}``).

The queue only says "look at lot X"; PostgreSQL says what its requests are and where
they stand. So a message delivered twice, late, or for a lot whose requests ended is
harmless: the worker loads the lot and does what its requests' states allow. (A message
of a request accepted before lots names the request: a lot of one.) Submit writes the
message into its service's outbox in the statement that records the lot, so the relay
publishes it once the lot exists, whatever crashes; Submit also publishes it at once
after the commit. Both carry ``Nats-Msg-Id`` = the lot id padded to a UUID, so JetStream
keeps one message within its duplicate window (decisions 0033, 0035).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from shipyard_asyncinference.domain.lots import MAX_LOT_SIZE
from shipyard_core.bus import EVENTS_STREAM
from shipyard_core.eventstore.envelope import subject_token

ASYNC_STREAM = "ASYNC"
SUBJECT_PREFIX = "async.requests"
WORKERS_CONSUMER = "asyncinference_workers"
DUPLICATE_WINDOW_SECONDS = 600.0
_ID = re.compile(r"^(?:[0-9a-f]{24}|[0-9a-f]{32})$")


def stream_config() -> StreamConfig:
    """The ``ASYNC`` stream (see infra/jetstream)."""
    return StreamConfig(
        name=ASYNC_STREAM,
        subjects=[f"{SUBJECT_PREFIX}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.WORK_QUEUE,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        description="Async prediction requests to run (the requests themselves are in "
        "PostgreSQL, schema asyncinference).",
    )


def consumer_config(ack_wait_seconds: float, max_ack_pending: int) -> ConsumerConfig:
    """The workers' shared durable pull consumer. Deliveries are not bounded here: the
    request's own attempt count (in its events) bounds them."""
    return ConsumerConfig(
        durable_name=WORKERS_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_seconds,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        filter_subject=f"{SUBJECT_PREFIX}.>",
    )


async def ensure_queue(js: JetStreamContext, ack_wait_seconds: float) -> None:
    """Creates (or updates) the stream and the workers' consumer; safe to race."""
    config = stream_config()
    try:
        await js.stream_info(ASYNC_STREAM)
        await js.update_stream(config)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
    consumer = consumer_config(ack_wait_seconds, max_ack_pending=10_000)
    try:
        await js.add_consumer(ASYNC_STREAM, consumer)
    except BadRequestError:
        # Exists with another configuration (an older ack wait): the new one wins.
        await js.delete_consumer(ASYNC_STREAM, WORKERS_CONSUMER)
        await js.add_consumer(ASYNC_STREAM, consumer)


def subject(deployment: str, lot_id: str) -> str:
    """``async.requests.<deployment>.<lot id>``: one subject per lot, so whether a lot's
    message is still in the stream can be asked (:func:`is_queued`)."""
    return f"{SUBJECT_PREFIX}.{subject_token(deployment)}.{subject_token(lot_id)}"


_RETIRED_DISPATCHER = "policy_asyncinference_dispatch"


async def retire_dispatcher(js: JetStreamContext) -> None:
    """Deletes the ``EVENTS`` consumer of the dispatcher older versions ran (queue
    messages now leave through the outbox), so it stops tracking every event."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(EVENTS_STREAM, _RETIRED_DISPATCHER)


def message(lot_id: str, request_ids: Sequence[str]) -> bytes:
    """The body of a queue message: which lot to look at, and its requests' ids (so their
    payloads can be read while the lot is loaded; empty: not known)."""
    return json.dumps({"lot_id": lot_id, "requests": list(request_ids)}).encode()


async def is_queued(js: JetStreamContext, lot_id: str, deployment: str) -> bool:
    """Whether the lot's message is in the stream (waiting, or delivered and not
    acknowledged yet)."""
    try:
        await js.get_last_msg(ASYNC_STREAM, subject(deployment, lot_id))
    except NotFoundError:
        return False
    return True


async def enqueue(
    js: JetStreamContext,
    lot_id: str,
    deployment: str,
    msg_id: str,
    request_ids: Sequence[str] = (),
) -> None:
    """Puts ``lot_id`` on the queue directly, deduplicated by ``msg_id`` within the
    window (Submit's fast path; the sweeper's re-dispatch of a lost message)."""
    await js.publish(
        subject(deployment, lot_id),
        message(lot_id, request_ids),
        stream=ASYNC_STREAM,
        headers={"Nats-Msg-Id": msg_id},
    )


def lot_of_message(body: bytes) -> tuple[str, list[str]]:
    """``(lot id, its request ids if given)`` of a queue message (a request's from before
    lots: its own lot of one); ``ValueError`` for a malformed one."""
    try:
        data = json.loads(body)
        if "lot_id" in data:
            value, ids = data["lot_id"], data.get("requests") or []
        else:
            value = data["request_id"]
            ids = [value]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"not an async queue message: {exc}") from exc
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"not an async queue message: lot id {str(value)[:40]!r}")
    if not isinstance(ids, list) or not all(isinstance(i, str) and _ID.match(i) for i in ids):
        raise ValueError("not an async queue message: requests must be request ids")
    return value, ids[:MAX_LOT_SIZE]
