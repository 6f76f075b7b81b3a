"""The work queue: JetStream stream ``ASYNC`` (work-queue retention), subjects
``async.requests.<deployment>.<request id>``, one message per request to run (body: its
id).

The queue only says "look at request X"; PostgreSQL says what X is and where it stands.
So a message delivered twice, late, or for a request that ended is harmless: the worker
loads the request and does what its state allows. Submit writes the message into its
service's outbox in the transaction that records the request, so the relay publishes it
once the request exists, whatever crashes; Submit also publishes it at once after the
commit. Both carry ``Nats-Msg-Id`` = the request id as a UUID, so JetStream keeps one
message within its duplicate window (decision 0033).
"""

from __future__ import annotations

import contextlib
import json

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from shipyard_core.bus import EVENTS_STREAM
from shipyard_core.eventstore.envelope import subject_token

ASYNC_STREAM = "ASYNC"
SUBJECT_PREFIX = "async.requests"
WORKERS_CONSUMER = "asyncinference_workers"
DUPLICATE_WINDOW_SECONDS = 600.0


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


def subject(deployment: str, request_id: str) -> str:
    """``async.requests.<deployment>.<request id>``: one subject per request, so whether a
    request's message is still in the stream can be asked (:func:`is_queued`)."""
    return f"{SUBJECT_PREFIX}.{subject_token(deployment)}.{subject_token(request_id)}"


_RETIRED_DISPATCHER = "policy_asyncinference_dispatch"


async def retire_dispatcher(js: JetStreamContext) -> None:
    """Deletes the ``EVENTS`` consumer of the dispatcher older versions ran (queue
    messages now leave through the outbox), so it stops tracking every event."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(EVENTS_STREAM, _RETIRED_DISPATCHER)


def message(request_id: str) -> bytes:
    """The body of a queue message: which request to look at."""
    return json.dumps({"request_id": request_id}).encode()


async def is_queued(js: JetStreamContext, request_id: str, deployment: str) -> bool:
    """Whether the request's message is in the stream (waiting, or delivered and not
    acknowledged yet)."""
    try:
        await js.get_last_msg(ASYNC_STREAM, subject(deployment, request_id))
    except NotFoundError:
        return False
    return True


async def enqueue(js: JetStreamContext, request_id: str, deployment: str, msg_id: str) -> None:
    """Puts ``request_id`` on the queue directly, deduplicated by ``msg_id`` within the
    window (Submit's fast path; the sweeper's re-dispatch of a lost message)."""
    await js.publish(
        subject(deployment, request_id),
        message(request_id),
        stream=ASYNC_STREAM,
        headers={"Nats-Msg-Id": msg_id},
    )


def request_id_of(body: bytes) -> str:
    """The request id of a queue message; ``ValueError`` for a malformed one."""
    try:
        value = json.loads(body)["request_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not an async queue message: {exc}") from exc
    if not isinstance(value, str) or not value:
        raise ValueError("not an async queue message: no request_id")
    return value
