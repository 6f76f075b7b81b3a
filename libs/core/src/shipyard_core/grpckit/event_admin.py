"""EventAdmin: list a service's events, report its consumers' lag, replay a projection."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from nats.js.errors import NotFoundError

from shipyard.common.v1 import events_pb2, events_pb2_grpc
from shipyard_core.auth import current_principal
from shipyard_core.errors import InvalidArgument, NotFound
from shipyard_core.eventstore import StoredEvent
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_core.projections import replay_projection

if TYPE_CHECKING:
    from shipyard_core.service import EventSourcedService

MAX_LIST = 1000


def event_to_proto(event: StoredEvent) -> events_pb2.Event:
    """The shared envelope as protobuf."""
    return events_pb2.Event(
        event_id=str(event.event_id),
        stream_id=event.stream_id,
        version=event.version,
        aggregate=event.aggregate,
        event_type=event.event_type,
        schema_version=event.schema_version,
        payload_json=json.dumps(event.payload, sort_keys=True),
        metadata_json=json.dumps(event.metadata, sort_keys=True),
        recorded_at=to_timestamp(event.recorded_at),
        service=event.service,
        position=event.position,
    )


class EventAdminApi(events_pb2_grpc.EventAdminServicer):
    """Operator tooling over one service's store. Admin only: events span every group."""

    def __init__(self, svc: EventSourcedService) -> None:
        self.svc = svc

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: Any
    ) -> events_pb2.ListEventsResponse:
        current_principal().require_admin("reading the event store")
        limit = request.limit or 100
        if not 0 < limit <= MAX_LIST:
            raise InvalidArgument("limit", f"must be between 1 and {MAX_LIST}, got {limit}")
        if request.after_position < 0:
            raise InvalidArgument("after_position", "must be >= 0")
        events = await self.svc.store.read_all(
            request.after_position, limit, stream_id=request.stream_id or None
        )
        return events_pb2.ListEventsResponse(
            events=[event_to_proto(e) for e in events],
            last_position=events[-1].position if events else request.after_position,
        )

    async def GetLag(
        self, request: events_pb2.GetLagRequest, context: Any
    ) -> events_pb2.GetLagResponse:
        current_principal().require_admin("reading consumer lag")
        out = []
        async with self.svc.pool.acquire() as conn:
            if self.svc.relay is not None:
                out.append(
                    events_pb2.ConsumerLag(
                        name="outbox-relay",
                        service=self.svc.service,
                        outbox_pending=await self.svc.relay.pending(conn),
                    )
                )
            for runner in self.svc.runners:
                try:
                    lag = await runner.lag(conn)
                except NotFoundError:
                    continue  # consumer not created yet
                out.append(
                    events_pb2.ConsumerLag(
                        name=lag.name,
                        service=self.svc.service,
                        pending=lag.pending,
                        ack_pending=lag.ack_pending,
                        redelivered=lag.redelivered,
                        dead_lettered=lag.dead_lettered,
                    )
                )
        return events_pb2.GetLagResponse(consumers=out)

    async def ReplayProjection(
        self, request: events_pb2.ReplayProjectionRequest, context: Any
    ) -> events_pb2.ReplayProjectionResponse:
        current_principal().require_admin("replaying projections")
        by_name = {p.name: p for p in self.svc.projections}
        projection = by_name.get(request.projection)
        if projection is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise NotFound(
                f"projection {request.projection!r} is not served by {self.svc.service} "
                f"(known: {known})"
            )
        result = await replay_projection(projection, self.svc.pool, swap=not request.check_only)
        return events_pb2.ReplayProjectionResponse(
            projection=result.projection,
            events=result.events,
            seconds=result.seconds,
            events_per_second=result.events_per_second,
            swapped=result.swapped,
            equal=result.equal,
            differences=result.differences[:20],
        )
