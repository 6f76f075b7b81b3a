"""Event administration: stored events, consumer lag and projection replay (the
``EventAdmin`` API every event-sourced service serves on its own port), and a live tail of
domain events from NATS JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shipyard.client._channel import Transport
from shipyard.client._convert import PlainData, parse_datetime, to_datetime
from shipyard.client.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShipyardClientError,
    Unavailable,
)
from shipyard.common.v1 import events_pb2 as pb
from shipyard.common.v1 import events_pb2_grpc as pb_grpc

# The services that keep an event store (and so serve EventAdmin) today. The logging
# service's store is empty, but its projection of deployment owners is lagged and replayed
# the same way.
EVENT_SOURCED_SERVICES: tuple[str, ...] = ("keys", "quota", "imagebuild", "scheduler", "logging")

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
EVENTS_STREAM = "EVENTS"

# Replays read a whole event store; they get far longer than the default deadline.
REPLAY_TIMEOUT = 3600.0


def _json_or_text(text: str) -> Any:
    """Decodes a JSON field; text that is not JSON is kept as is rather than lost."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class Event(PlainData):
    """One stored domain event (the envelope every service shares).

    ``position`` is the event's place in its service's commit order; events that come
    live from JetStream have none.
    """

    event_id: str
    stream_id: str
    version: int
    aggregate: str
    event_type: str
    schema_version: int
    payload: Any
    metadata: Any
    recorded_at: datetime | None
    service: str
    position: int | None = None

    @classmethod
    def from_proto(cls, msg: pb.Event) -> Event:
        """Builds it from the protobuf message (payload and metadata decoded from JSON)."""
        return cls(
            event_id=msg.event_id,
            stream_id=msg.stream_id,
            version=msg.version,
            aggregate=msg.aggregate,
            event_type=msg.event_type,
            schema_version=msg.schema_version,
            payload=_json_or_text(msg.payload_json),
            metadata=_json_or_text(msg.metadata_json),
            recorded_at=to_datetime(msg.recorded_at),
            service=msg.service,
            position=msg.position,
        )

    @classmethod
    def from_envelope(cls, envelope: dict[str, Any]) -> Event:
        """Builds it from the JSON envelope published on JetStream."""

        def _int(key: str) -> int:
            value = envelope.get(key)
            return value if isinstance(value, int) else 0

        return cls(
            event_id=str(envelope.get("event_id", "")),
            stream_id=str(envelope.get("stream_id", "")),
            version=_int("version"),
            aggregate=str(envelope.get("aggregate", "")),
            event_type=str(envelope.get("event_type", "")),
            schema_version=_int("schema_version"),
            payload=envelope.get("payload", {}),
            metadata=envelope.get("metadata", {}),
            recorded_at=parse_datetime(envelope.get("recorded_at")),
            service=str(envelope.get("service", "")),
        )


@dataclass(frozen=True)
class EventPage(PlainData):
    """A page of events; pass ``last_position`` as ``after`` to get the next one."""

    events: list[Event] = field(default_factory=list)
    last_position: int = 0


@dataclass(frozen=True)
class ConsumerLag(PlainData):
    """How far one projection / consumer (or the outbox relay) is behind."""

    name: str
    service: str
    pending: int = 0
    ack_pending: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    outbox_pending: int = 0

    @classmethod
    def from_proto(cls, msg: pb.ConsumerLag) -> ConsumerLag:
        """Builds it from the protobuf message."""
        return cls(
            name=msg.name,
            service=msg.service,
            pending=msg.pending,
            ack_pending=msg.ack_pending,
            redelivered=msg.redelivered,
            dead_lettered=msg.dead_lettered,
            outbox_pending=msg.outbox_pending,
        )


@dataclass(frozen=True)
class ReplayResult(PlainData):
    """What a projection replay did: events read, time taken, and whether the rebuilt
    tables equal the live ones (compared before any swap)."""

    projection: str
    events: int
    seconds: float
    events_per_second: float
    swapped: bool
    equal: bool
    differences: list[str] = field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: pb.ReplayProjectionResponse) -> ReplayResult:
        """Builds it from the protobuf message."""
        return cls(
            projection=msg.projection,
            events=msg.events,
            seconds=msg.seconds,
            events_per_second=msg.events_per_second,
            swapped=msg.swapped,
            equal=msg.equal,
            differences=list(msg.differences),
        )


@dataclass(frozen=True)
class LiveEvent(PlainData):
    """An event as it arrived on JetStream: the decoded event, its subject and the raw
    envelope (kept whole, so fields a newer service adds are not lost)."""

    event: Event
    subject: str
    envelope: dict[str, Any]


class EventsClient:
    """EventAdmin calls on one service. Obtain it as ``Client().events("quota")``."""

    def __init__(self, transport: Transport, service: str) -> None:
        self._transport = transport
        self.service = service

    def _stub(self) -> pb_grpc.EventAdminStub:
        return self._transport.stub(self.service, pb_grpc.EventAdminStub)

    def list_events(
        self, *, stream_id: str | None = None, after: int = 0, limit: int = 100
    ) -> EventPage:
        """Stored events in commit order after position ``after`` (at most ``limit``,
        the server caps it at 1000), optionally of one stream only."""
        request = pb.ListEventsRequest(stream_id=stream_id or "", after_position=after, limit=limit)
        reply: pb.ListEventsResponse = self._transport.call(
            self.service, "ListEvents", self._stub().ListEvents, request
        )
        return EventPage(
            events=[Event.from_proto(e) for e in reply.events],
            last_position=reply.last_position,
        )

    def iter_events(
        self, *, stream_id: str | None = None, after: int = 0, page_size: int = 500
    ) -> Iterator[Event]:
        """Every stored event after ``after``, fetched page by page."""
        while True:
            page = self.list_events(stream_id=stream_id, after=after, limit=page_size)
            yield from page.events
            if not page.events or page.last_position <= after:
                return
            after = page.last_position

    def lag(self) -> list[ConsumerLag]:
        """Each projection / consumer of the service with its lag."""
        reply: pb.GetLagResponse = self._transport.call(
            self.service, "GetLag", self._stub().GetLag, pb.GetLagRequest()
        )
        return [ConsumerLag.from_proto(c) for c in reply.consumers]

    def replay(
        self, projection: str, *, check: bool = False, timeout: float = REPLAY_TIMEOUT
    ) -> ReplayResult:
        """Rebuilds a projection from the event store (admin only). With ``check=True`` it
        only compares the rebuilt tables with the live ones and swaps nothing."""
        reply: pb.ReplayProjectionResponse = self._transport.call(
            self.service,
            "ReplayProjection",
            self._stub().ReplayProjection,
            pb.ReplayProjectionRequest(projection=projection, check_only=check),
            timeout=timeout,
        )
        return ReplayResult.from_proto(reply)


def nats_url_from_env() -> str:
    """The NATS URL: ``$SHIPYARD_NATS_URL`` or ``nats://127.0.0.1:4222``."""
    return os.environ.get("SHIPYARD_NATS_URL") or DEFAULT_NATS_URL


def tail_subject(service: str | None = None, aggregate: str | None = None) -> str:
    """The JetStream subject filter for a tail: ``events.<service|*>.<aggregate|*>.>``."""
    for name, value in (("service", service), ("aggregate", aggregate)):
        if value is not None and (not value or any(c in value for c in ".*> \t\r\n")):
            raise InvalidArgument(
                f"{name}: {value!r} is not a subject token (no dots, spaces or wildcards)"
            )
    return f"events.{service or '*'}.{aggregate or '*'}.>"


def _decode(subject: str, data: bytes) -> LiveEvent:
    """Decodes one message; a body that is not a JSON object still yields a LiveEvent
    (built from the subject), so one bad message does not end the tail."""
    try:
        envelope = json.loads(data)
    except ValueError:
        envelope = None
    if not isinstance(envelope, dict):
        parts = subject.split(".", 3)
        envelope = {
            "service": parts[1] if len(parts) > 1 else "",
            "aggregate": parts[2] if len(parts) > 2 else "",
            "stream_id": parts[3] if len(parts) > 3 else "",
            "event_type": "<undecodable>",
            "payload": data.decode("utf-8", "replace"),
        }
    return LiveEvent(event=Event.from_envelope(envelope), subject=subject, envelope=envelope)


async def tail_events(
    *,
    nats_url: str | None = None,
    service: str | None = None,
    aggregate: str | None = None,
    stream: str = EVENTS_STREAM,
    connect_timeout: float = 3.0,
    on_status: Callable[[str], None] | None = None,
) -> AsyncIterator[LiveEvent]:
    """Yields domain events published from now on, live from JetStream.

    Uses an ephemeral ordered consumer (no state left on the server, nothing to ack)
    filtered on ``events.<service|*>.<aggregate|*>.>``. After a lost connection it resumes
    right after the last event it yielded, so a NATS restart loses nothing. ``on_status``
    hears when the tail is ready and about lost and regained connections. Raises
    :class:`Unavailable` when NATS cannot be reached and :class:`NotFound` when the stream
    does not exist.
    """
    # nats-py is imported here so the rest of the client works without it.
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js.api import ConsumerConfig, DeliverPolicy

    url = nats_url or nats_url_from_env()
    subject = tail_subject(service, aggregate)
    # Messages and "resubscribe" markers, in arrival order, from nats-py's callbacks.
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    resubscribe = object()
    closing = False

    def _status(text: str) -> None:
        if on_status is not None:
            on_status(text)

    # nats-py's default callbacks log whole tracebacks; a tail reports in one line instead.
    async def _on_error(exc: Exception) -> None:
        return None

    async def _on_disconnect() -> None:
        # nats-py reports our own close() as a disconnect too; that one is not news.
        if not closing:
            _status(f"lost the connection to NATS at {url}; reconnecting")

    async def _on_reconnect() -> None:
        _status(f"reconnected to NATS at {url}")
        # An ordered consumer lives in the server's memory: after a NATS restart it is
        # gone and nats-py does not notice, so the tail makes a new one itself.
        inbox.put_nowait(resubscribe)

    async def _on_message(msg: Any) -> None:
        inbox.put_nowait(msg)

    try:
        nc = await nats.connect(
            url,
            connect_timeout=max(1, round(connect_timeout)),
            # Few attempts so an unreachable NATS fails in seconds rather than minutes.
            max_reconnect_attempts=2,
            reconnect_time_wait=1,
            error_cb=_on_error,
            disconnected_cb=_on_disconnect,
            reconnected_cb=_on_reconnect,
            name="shipyard-events-tail",
        )
    except (nats.errors.Error, OSError, TimeoutError):
        raise Unavailable(f"cannot reach NATS at {url}", service="nats") from None
    # Once connected, a tail should ride out a NATS restart instead of giving up.
    nc.options["max_reconnect_attempts"] = -1
    js = nc.jetstream()
    last_sequence: int | None = None

    async def _subscribe() -> Any:
        nonlocal last_sequence
        try:
            if last_sequence is None:
                # "From now on" as an explicit sequence, so a resubscription after a lost
                # connection can continue from the same place even before any event came.
                info = await js.stream_info(stream)
                last_sequence = info.state.last_seq
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last_sequence + 1
            )
            return await js.subscribe(
                subject, stream=stream, cb=_on_message, ordered_consumer=True, config=config
            )
        except nats.js.errors.NotFoundError:
            raise NotFound(
                f"stream {stream} not found at {url} (no service has published events yet?)",
                service="nats",
            ) from None
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            raise Unavailable(
                f"JetStream is not enabled on the NATS server at {url}", service="nats"
            ) from None
        except nats.errors.TimeoutError:
            raise Unavailable(
                f"JetStream at {url} did not answer in time", service="nats"
            ) from None
        except nats.js.errors.APIError as exc:
            raise FailedPrecondition(
                f"JetStream refused the tail: {exc.description or exc}", service="nats"
            ) from None

    try:
        sub = await _subscribe()
        _status(f"tailing {subject} on {url} (Ctrl-C to stop)")
        while True:
            item = await inbox.get()
            if item is resubscribe:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                sub = await _resubscribe(_subscribe, _status)
                continue
            with contextlib.suppress(Exception):  # a message without JetStream metadata
                last_sequence = item.metadata.sequence.stream
            yield _decode(item.subject, item.data)
    finally:
        closing = True
        await nc.close()


async def _resubscribe(
    subscribe: Callable[[], Awaitable[Any]], status: Callable[[str], None]
) -> Any:
    """Subscribes again after a reconnect, retrying while JetStream is still starting up."""
    delay = 0.5
    while True:
        try:
            sub = await subscribe()
        except ShipyardClientError as exc:
            status(f"cannot resume the tail yet ({exc.message}); retrying")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        status("tail resumed where it stopped")
        return sub
