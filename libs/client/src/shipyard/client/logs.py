"""The logging service: the log lines of deployments' instances (replicas).

>>> client.logs.tail("iris-prod")                       # the last 2000 lines, oldest first
>>> client.logs.tail("iris-prod", instance="iris-prod-r1-x7k2p", tail=100, grep="error")
>>> for line in client.logs.follow("iris-prod"): print(line.text)   # until interrupted
>>> client.logs.download("iris-prod", "iris-prod-r1-x7k2p", "replica.log")

The same calls are on ``client.deployments`` as ``logs``, ``follow_logs`` and
``download_logs``. Times are aware UTC datetimes; ``since`` and ``until`` also take a
duration before now (``timedelta``), like ``shipyard deploy logs --since 1h``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from shipyard.client._channel import Transport
from shipyard.client._convert import PlainData, enum_name, to_datetime
from shipyard.client.errors import ShipyardClientError, from_rpc_error
from shipyard.logging.v1 import logging_pb2 as pb
from shipyard.logging.v1 import logging_pb2_grpc as pb_grpc

SERVICE = "logging"
DEFAULT_TAIL = 2000
"""Lines a tail returns when no number is given (the service's default too)."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$")
_UNITS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}

When = datetime | timedelta | None


@dataclass(frozen=True)
class LogLine(PlainData):
    """One line an instance wrote. ``cut`` marks a line longer than 16 KiB that goes on in
    the next line; ``offset`` is its position in the instance's log."""

    at: datetime | None
    deployment: str
    revision: int
    instance: str
    stream: str
    offset: int
    text: str
    cut: bool = False

    @classmethod
    def from_proto(cls, msg: pb.LogLine) -> LogLine:
        """Builds it from the protobuf message."""
        return cls(
            at=to_datetime(msg.at),
            deployment=msg.deployment,
            revision=msg.revision,
            instance=msg.instance,
            stream=enum_name(pb.LogStream.Name, msg.stream, "LOG_STREAM_"),
            offset=msg.offset,
            text=msg.text,
            cut=msg.cut,
        )


@dataclass(frozen=True)
class LogSource(PlainData):
    """An instance with stored lines."""

    instance: str
    revision: int
    lines: int
    first_at: datetime | None
    last_at: datetime | None

    @classmethod
    def from_proto(cls, msg: pb.LogSource) -> LogSource:
        """Builds it from the protobuf message."""
        return cls(
            instance=msg.instance,
            revision=msg.revision,
            lines=msg.lines,
            first_at=to_datetime(msg.first_at),
            last_at=to_datetime(msg.last_at),
        )


def parse_duration(text: str) -> timedelta:
    """``90``, ``30s``, ``15m``, ``1h``, ``2d`` → a timedelta; ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 15m, 1h or 2d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def timestamp(value: When) -> Timestamp | None:
    """A time, or a duration before now, as a protobuf Timestamp (None stays None)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = datetime.now(UTC) - value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _filter(
    deployment: str, instance: str | None, since: When, until: When, grep: str | None
) -> pb.LogFilter:
    return pb.LogFilter(
        deployment=deployment,
        instance=instance or "",
        since=timestamp(since),
        until=timestamp(until),
        grep=grep or "",
    )


class LogsClient:
    """Typed calls to the logging service. Obtain it as ``Client().logs``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _stub(self) -> pb_grpc.LogServiceStub:
        return self._transport.stub(SERVICE, pb_grpc.LogServiceStub)

    def _error(self, err: grpc.RpcError, method: str, timeout: float | None) -> ShipyardClientError:
        return from_rpc_error(
            err,
            service=SERVICE,
            address=self._transport.address(SERVICE),
            method=method,
            has_token=self._transport.has_token,
            timeout=timeout,
        )

    def _stream(self, method: str, request: Any, timeout: float | None) -> Iterator[LogLine]:
        call = getattr(self._stub(), method)(
            request, metadata=self._transport.metadata(), timeout=timeout
        )
        try:
            for batch in call:
                for line in batch.lines:
                    yield LogLine.from_proto(line)
        except grpc.RpcError as err:
            raise self._error(err, method, timeout) from None
        finally:
            call.cancel()  # a no-op once the stream ended; stops it when the reader quits

    def tail(
        self,
        deployment: str,
        *,
        instance: str | None = None,
        tail: int = DEFAULT_TAIL,
        since: When = None,
        until: When = None,
        grep: str | None = None,
    ) -> list[LogLine]:
        """The last ``tail`` lines of a deployment (every instance, in arrival order) or
        of one instance (in its order), oldest first; only lines stamped in
        ``[since, until)`` and containing ``grep`` (case-insensitive) when given."""
        request = pb.TailLogsRequest(
            filter=_filter(deployment, instance, since, until, grep), limit=tail
        )
        return list(self._stream("TailLogs", request, self._transport.timeout))

    def follow(
        self,
        deployment: str,
        *,
        instance: str | None = None,
        tail: int = 10,
        since: When = None,
        grep: str | None = None,
    ) -> Iterator[LogLine]:
        """The last ``tail`` lines, then every new line as it arrives, until the caller
        stops iterating (no deadline)."""
        request = pb.FollowLogsRequest(
            filter=_filter(deployment, instance, since, None, grep), tail=tail
        )
        return self._stream("FollowLogs", request, None)

    def lines(self, deployment: str, instance: str) -> Iterator[LogLine]:
        """The whole stored log of one instance, oldest first (no deadline)."""
        request = pb.DownloadLogsRequest(deployment=deployment, instance=instance)
        return self._stream("DownloadLogs", request, None)

    def download(self, deployment: str, instance: str, path: str | os.PathLike[str]) -> int:
        """Writes the whole stored log of one instance to ``path`` (one line per line,
        a cut line joined with its continuation); returns how many lines were stored.
        The file appears only once complete."""
        count = 0
        tmp = f"{os.fspath(path)}.part"
        try:
            with open(tmp, "w", encoding="utf-8", newline="\n") as out:
                for line in self.lines(deployment, instance):
                    out.write(line.text)
                    if not line.cut:
                        out.write("\n")
                    count += 1
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return count

    def sources(self, deployment: str) -> list[LogSource]:
        """The instances of a deployment that have stored lines, newest first."""
        reply: pb.ListLogSourcesResponse = self._transport.call(
            SERVICE,
            "ListLogSources",
            self._stub().ListLogSources,
            pb.ListLogSourcesRequest(deployment=deployment),
        )
        return [LogSource.from_proto(s) for s in reply.sources]
