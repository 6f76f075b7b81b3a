"""LogService over gRPC: protobuf ↔ the app layer. No logic here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from shipyard.logging.v1 import logging_pb2 as pb
from shipyard.logging.v1 import logging_pb2_grpc
from shipyard_core.auth import current_principal
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_logging.app import LineView, LogQueries
from shipyard_logging.domain import DEFAULT_TAIL, LogQuery, check_limit, log_query

STREAMS = {
    "stdout": pb.LOG_STREAM_STDOUT,
    "stderr": pb.LOG_STREAM_STDERR,
    "output": pb.LOG_STREAM_OUTPUT,
}


def request_time(request: Any, field: str) -> datetime | None:
    """A Timestamp field of a request as an aware datetime; None when unset."""
    stamp: Timestamp = getattr(request, field)
    if not request.HasField(field):
        return None
    return stamp.ToDatetime(tzinfo=UTC)


def _query(f: pb.LogFilter) -> LogQuery:
    since, until = request_time(f, "since"), request_time(f, "until")
    return log_query(f.deployment, f.instance, since, until, f.grep, build=f.build_id)


# One streamed message holds at most this many lines and about this many bytes of text
# (a 16 KiB piece of invalid bytes is 48 KiB of U+FFFD; gRPC's default limit is 4 MiB).
_BATCH_LINES = 1000
_BATCH_BYTES = 1024 * 1024


def _line(ln: LineView) -> pb.LogLine:
    return pb.LogLine(
        at=to_timestamp(ln.at),
        deployment=ln.deployment,
        revision=ln.revision,
        instance=ln.instance,
        stream=STREAMS.get(ln.stream, pb.LOG_STREAM_UNSPECIFIED),
        offset=ln.offset,
        text=ln.text,
        cut=ln.cut,
        build_id=ln.build,
    )


def batches(lines: Sequence[LineView]) -> Iterator[pb.LogBatch]:
    """The lines as messages of at most 1000 lines and about 1 MiB each."""
    current: list[pb.LogLine] = []
    size = 0
    for ln in lines:
        length = len(ln.text) * 3 if not ln.text.isascii() else len(ln.text)
        if current and (len(current) >= _BATCH_LINES or size + length > _BATCH_BYTES):
            yield pb.LogBatch(lines=current)
            current, size = [], 0
        current.append(_line(ln))
        size += length + 64
    if current:
        yield pb.LogBatch(lines=current)


class LogApi(logging_pb2_grpc.LogServiceServicer):
    """The gRPC face of the log queries; ``stopping`` ends follows at shutdown."""

    def __init__(self, queries: LogQueries, stopping: asyncio.Event) -> None:
        self.queries = queries
        self.stopping = stopping

    async def TailLogs(
        self, request: pb.TailLogsRequest, context: Any
    ) -> AsyncIterator[pb.LogBatch]:
        query = _query(request.filter)
        limit = check_limit("limit", request.limit)
        lines = await self.queries.tail(current_principal(), query, limit)
        for batch in batches(lines):
            yield batch

    async def FollowLogs(
        self, request: pb.FollowLogsRequest, context: Any
    ) -> AsyncIterator[pb.LogBatch]:
        query = _query(request.filter)
        tail = DEFAULT_TAIL if request.tail == -1 else request.tail
        tail = 0 if tail == 0 else check_limit("tail", tail)
        async for lines in self.queries.follow(current_principal(), query, tail, self.stopping):
            for batch in batches(lines):
                yield batch

    async def DownloadLogs(
        self, request: pb.DownloadLogsRequest, context: Any
    ) -> AsyncIterator[pb.LogBatch]:
        query = log_query(request.deployment, request.instance, build=request.build_id)
        async for lines in self.queries.download(current_principal(), query):
            for batch in batches(lines):
                yield batch

    async def ListLogSources(
        self, request: pb.ListLogSourcesRequest, context: Any
    ) -> pb.ListLogSourcesResponse:
        log_query(request.deployment)
        views = await self.queries.sources(current_principal(), request.deployment)
        return pb.ListLogSourcesResponse(
            sources=[
                pb.LogSource(
                    instance=v.instance,
                    revision=v.revision,
                    lines=v.lines,
                    first_at=to_timestamp(v.first_at),
                    last_at=to_timestamp(v.last_at),
                )
                for v in views
            ]
        )
