"""The logging service: the log lines of deployments' instances (replicas) and of image
builds.

>>> client.logs.tail("iris-prod")                       # the last 2000 lines, oldest first
>>> client.logs.tail("iris-prod", instance="iris-prod-r1-x7k2p", tail=100, grep="error")
>>> for line in client.logs.follow("iris-prod"): print(line.text)   # until interrupted
>>> client.logs.download("iris-prod", "iris-prod-r1-x7k2p", "replica.log")

A build's log (lines numbered from 1, as ``client.images.log_lines`` gives them):

>>> for line in client.logs.build_log("iris:1", grep="error"): print(line.line)
>>> client.logs.tail_build("b-3f9c0a7d5e1b2c4a", tail=50)   # the logging service only
>>> client.logs.download_build("b-3f9c0a7d5e1b2c4a", "build.log")

The same calls are on ``client.deployments`` as ``logs``, ``follow_logs`` and
``download_logs``. Times are aware UTC datetimes; ``since`` and ``until`` also take a
duration before now (``timedelta``), like ``shipyard deploy logs --since 1h``.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from shipyard.client._channel import Transport
from shipyard.client._convert import PlainData, enum_name, to_datetime
from shipyard.client.errors import (
    NotFound,
    ShipyardClientError,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from shipyard.client.images import ImagesClient
from shipyard.client.images import LogLine as BuildLogLine
from shipyard.logging.v1 import logging_pb2 as pb
from shipyard.logging.v1 import logging_pb2_grpc as pb_grpc

SERVICE = "logging"
DEFAULT_TAIL = 2000
"""Lines a tail returns when no number is given (the service's default too)."""

# Build ids are ``b-`` and hex digits (16 of them today); anything else is an image.
_BUILD_ID = re.compile(r"^b-[0-9a-f]+$")
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
    deployment: str,
    instance: str | None,
    since: When,
    until: When,
    grep: str | None,
    build_id: str = "",
) -> pb.LogFilter:
    return pb.LogFilter(
        deployment=deployment,
        instance=instance or "",
        since=timestamp(since),
        until=timestamp(until),
        grep=grep or "",
        build_id=build_id,
    )


def _build_line(msg: pb.LogLine) -> BuildLogLine:
    """A build's line from the logging service, as imagebuild gives it (its offset is the
    line number)."""
    return BuildLogLine(seq=msg.offset, line=msg.text, at=to_datetime(msg.at))


def _matches(grep: str | None) -> Callable[[BuildLogLine], bool]:
    """``grep`` as the logging service applies it: contained, in any case."""
    needle = (grep or "").casefold()
    return lambda line: needle in line.line.casefold()


def _last(lines: Iterable[BuildLogLine], tail: int | None) -> list[BuildLogLine]:
    return list(deque(lines, maxlen=tail)) if tail is not None else list(lines)


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

    def _messages(self, method: str, request: Any, timeout: float | None) -> Iterator[pb.LogLine]:
        call = getattr(self._stub(), method)(
            request, metadata=self._transport.metadata(), timeout=timeout
        )
        try:
            for batch in call:
                yield from batch.lines
        except grpc.RpcError as err:
            raise self._error(err, method, timeout) from None
        finally:
            call.cancel()  # a no-op once the stream ended; stops it when the reader quits

    def _stream(self, method: str, request: Any, timeout: float | None) -> Iterator[LogLine]:
        for line in self._messages(method, request, timeout):
            yield LogLine.from_proto(line)

    def _build_stream(
        self, method: str, request: Any, timeout: float | None
    ) -> Iterator[BuildLogLine]:
        for line in self._messages(method, request, timeout):
            yield _build_line(line)

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
        return _write_whole(
            path,
            (line.text + ("" if line.cut else "\n") for line in self.lines(deployment, instance)),
        )

    def sources(self, deployment: str) -> list[LogSource]:
        """The instances of a deployment that have stored lines, newest first."""
        reply: pb.ListLogSourcesResponse = self._transport.call(
            SERVICE,
            "ListLogSources",
            self._stub().ListLogSources,
            pb.ListLogSourcesRequest(deployment=deployment),
        )
        return [LogSource.from_proto(s) for s in reply.sources]

    # Image builds' logs.

    def tail_build(
        self,
        build_id: str,
        *,
        tail: int = DEFAULT_TAIL,
        since: When = None,
        until: When = None,
        grep: str | None = None,
    ) -> list[BuildLogLine]:
        """The last ``tail`` lines of a build's log the logging service holds, oldest
        first; only lines stamped in ``[since, until)`` and containing ``grep`` (any
        case) when given. :class:`NotFound` when it holds none the caller may read (see
        :meth:`build_log`, which falls back to imagebuild's own copy)."""
        request = pb.TailLogsRequest(
            filter=_filter("", None, since, until, grep, build_id), limit=tail
        )
        return list(self._build_stream("TailLogs", request, self._transport.timeout))

    def follow_build(
        self, build_id: str, *, tail: int = 10, since: When = None, grep: str | None = None
    ) -> Iterator[BuildLogLine]:
        """The last ``tail`` lines, then every new line as the logging service stores
        it, until the caller stops iterating (it does not end with the build: see
        :meth:`build_log` with ``follow``)."""
        request = pb.FollowLogsRequest(
            filter=_filter("", None, since, None, grep, build_id), tail=tail
        )
        return self._build_stream("FollowLogs", request, None)

    def build_lines(self, build_id: str) -> Iterator[BuildLogLine]:
        """Every line of a build's log the logging service holds, in order (no deadline)."""
        request = pb.DownloadLogsRequest(build_id=build_id)
        return self._build_stream("DownloadLogs", request, None)

    def download_build(self, build_id: str, path: str | os.PathLike[str]) -> int:
        """Writes the build's log the logging service holds to ``path`` (the file appears
        only once complete); returns how many lines it has."""
        return _write_whole(path, (line.line + "\n" for line in self.build_lines(build_id)))

    def resolve_build(self, build_or_image: str, group: str | None = None) -> str:
        """The build id of ``build_or_image``: a build id (``b-`` and hex digits), or an
        image (``name:version``, or ``name`` for the latest; an image whose name looks like
        a build id needs its version) whose build it returns."""
        if _BUILD_ID.match(build_or_image):
            return build_or_image
        found = self._images().get(build_or_image, group=group)
        if not found.build_id:
            raise NotFound(
                f"image {found.name}:{found.version} names no build",
                service="imagebuild",
                hint=f"see `shipyard image builds --name {found.name}`",
            )
        return found.build_id

    def build_log(
        self,
        build_or_image: str,
        *,
        tail: int | None = None,
        grep: str | None = None,
        follow: bool = False,
        group: str | None = None,
    ) -> Iterator[BuildLogLine]:
        """A build's log, as ``shipyard image logs`` prints it, for a build id or an image
        (``name:version``; ``group`` when the name is in several of the caller's groups).

        Where it comes from (decision 0032): the whole log, and ``follow`` (live until
        the build ends), from imagebuild's own copy, which holds every line before it is
        published to the logging service and keeps it after the logs' retention; so does
        ``grep`` without ``tail`` (every matching line). The last ``tail`` lines (matching
        ``grep``: contained, any case) are the logging service's query; when it is
        unreachable or holds no line of the build (retention passed, not ingested yet, a
        build from before builds were published), imagebuild's copy is read and filtered
        here. So every caller gets the whole log either way."""
        build_id = self.resolve_build(build_or_image, group)
        images = self._images()
        keep = _matches(grep)
        if follow:
            # The last ``tail`` lines: where they start is known from one read of the log.
            start = 1
            if tail is not None:
                matching = [ln.seq for ln in images.log_lines(build_id) if keep(ln)]
                start = matching[-tail] if len(matching) >= tail else 1
            for line in images.log_lines(build_id, follow=True):
                if line.seq >= start and keep(line):
                    yield line
            return
        if tail is None:
            # Every line (or every matching one): imagebuild's copy is whole and current;
            # the logging service answers at most the last 2000.
            yield from (ln for ln in images.log_lines(build_id) if keep(ln))
            return
        try:
            found = self.tail_build(build_id, tail=tail, grep=grep)
        except (NotFound, Unavailable, Unimplemented):
            found = []
        if found:
            yield from found
            return
        # Not (yet, or any more) in the logging service: imagebuild's copy, filtered here.
        lines = (ln for ln in images.log_lines(build_id) if keep(ln))
        yield from _last(lines, tail)

    def _images(self) -> ImagesClient:
        return ImagesClient(self._transport)


def _write_whole(path: str | os.PathLike[str], pieces: Iterable[str]) -> int:
    """Writes ``pieces`` to ``path`` through a ``.part`` file renamed at the end, so the
    file appears only once complete; returns how many pieces were written."""
    count = 0
    tmp = f"{os.fspath(path)}.part"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            for piece in pieces:
                out.write(piece)
                count += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return count
