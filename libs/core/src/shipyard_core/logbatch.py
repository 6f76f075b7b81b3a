"""The messages of the ``LOGS`` stream: batches of log lines of one source.

A *source* is one instance (replica) of a deployment, or one image build. Its log is a
sequence of lines, each at an *offset*: its position in the source (the byte offset in
the instance's log file for the local runtime; any increasing number for other shippers,
e.g. a line counter for pod logs; a build's line number, from 1). A shipper publishes
consecutive batches; a batch covers the positions ``[start, end)`` and holds the lines
that begin there (a position may hold no line: a source starts at position 0, a build's
first line is at 1, so its first batch covers ``[0, n + 1)``).

Subject: ``logs.<kind>.<deployment>.<source>`` (``kind`` is ``instance`` or ``build``;
a build has ``-`` for the deployment). ``Nats-Msg-Id``: ``<source>:<start>-<end>``, so a
batch published twice (a shipper killed after publishing, before it saved its position)
is stored once by JetStream; the logging service also skips lines below the position it
has stored for the source, which catches re-sends after the duplicate window and
re-sends that cover a longer range.

Body (JSON, compact)::

    {"v": 1, "kind": "instance", "source": "iris-r1-x7k2p", "deployment": "iris",
     "revision": 1, "stream": "output", "start": 0, "end": 96,
     "lines": [[0, 1763798400123456, "text", false], ...]}

    {"v": 1, "kind": "build", "source": "b-3f9c0a7d5e1b2c4a", "deployment": "",
     "revision": 0, "stream": "output", "start": 0, "end": 41,
     "group": "team-a", "image": "iris", "lines": [[1, 1763798400123456, "...", false], ...]}

A build's batch also names the build's ``group`` (members of it, and admins, read the
log) and its ``image`` name. Both fields are optional, added within format 1: they are
left out when empty (an instance's batch is byte for byte what it was before them), a
batch without them decodes with both empty (a build whose group is unknown is readable
by admins only, until a batch that names it arrives), and decoders that predate them
ignore them.

Each line is ``[offset, at (microseconds since the epoch, UTC), text, cut]``. Lines are
bytes: they are decoded as UTF-8 with invalid sequences replaced by U+FFFD, NUL becomes
U+FFFD too (PostgreSQL text cannot hold it), and a line longer than :data:`MAX_LINE_BYTES`
is stored as pieces of that size, each but the last with ``cut`` true.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from nats.js import JetStreamContext

FORMAT_VERSION = 1
MAX_LINE_BYTES = 16 * 1024
"""A longer line is split into pieces of this many bytes (``cut`` on all but the last)."""
MAX_BATCH_BYTES = 128 * 1024
"""Raw bytes a shipper puts into one batch at most (JSON escaping may grow it up to six
times, which stays under NATS's default 1 MiB payload)."""

Kind = Literal["instance", "build"]
Stream = Literal["stdout", "stderr", "output"]
STREAMS: tuple[Stream, ...] = ("stdout", "stderr", "output")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(at: datetime) -> int:
    """Microseconds since the epoch of an aware datetime."""
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    """The UTC datetime of microseconds since the epoch."""
    return _EPOCH + timedelta(microseconds=micros)


def clean_text(raw: bytes, *, strip: bool = True) -> str:
    """A line's bytes as storable text: UTF-8 with invalid bytes and NUL as U+FFFD, the
    line ending (``\\n``, ``\\r\\n``) removed unless ``strip`` is false."""
    if strip and raw.endswith(b"\n"):
        raw = raw[:-1]
    if strip and raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def _storable(text: str) -> str:
    """Text from a message as PostgreSQL can store it: no NUL, no lone surrogates (JSON
    allows ``\\ud800``; UTF-8 does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text.replace("\x00", "\ufffd")


@dataclass(frozen=True)
class Line:
    """One stored line."""

    offset: int
    at: datetime
    text: str
    cut: bool = False


@dataclass(frozen=True)
class LogBatch:
    """Consecutive lines of one source, covering positions ``[start, end)``."""

    kind: Kind
    source: str
    deployment: str
    revision: int
    stream: Stream
    start: int
    end: int
    lines: list[Line] = field(default_factory=list)
    group: str = ""
    """The build's group (kind ``build``): who may read its lines. Optional."""
    image: str = ""
    """The name of the image the build makes (kind ``build``). Optional."""

    @property
    def subject(self) -> str:
        """``logs.<kind>.<deployment>.<source>``."""
        return f"logs.{self.kind}.{self.deployment or '-'}.{self.source}"

    @property
    def msg_id(self) -> str:
        """The ``Nats-Msg-Id``: the same range of the same source is one message."""
        return f"{self.source}:{self.start}-{self.end}"

    def encode(self) -> bytes:
        """The message body."""
        body: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "kind": self.kind,
            "source": self.source,
            "deployment": self.deployment,
            "revision": self.revision,
            "stream": self.stream,
            "start": self.start,
            "end": self.end,
        }
        # Optional fields only when set: instances' batches stay as they were.
        if self.group:
            body["group"] = self.group
        if self.image:
            body["image"] = self.image
        body["lines"] = [[ln.offset, to_micros(ln.at), ln.text, ln.cut] for ln in self.lines]
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> LogBatch:
        """Parses a message body; raises ValueError when it is not a valid batch."""
        try:
            body: Any = json.loads(data)
            if not isinstance(body, dict):
                raise ValueError("the body is not a JSON object")
            if body.get("v") != FORMAT_VERSION:
                raise ValueError(f"unknown log batch format {body.get('v')!r}")
            kind, stream = body["kind"], body["stream"]
            if kind not in ("instance", "build") or stream not in STREAMS:
                raise ValueError(f"bad kind {kind!r} or stream {stream!r}")
            lines = [
                Line(int(o), from_micros(int(t)), _storable(str(x)), bool(c))
                for o, t, x, c in body["lines"]
            ]
            group, image = body.get("group", ""), body.get("image", "")
            if not isinstance(group, str) or not isinstance(image, str):
                raise ValueError("group and image must be strings")
            batch = cls(
                kind=kind,
                source=str(body["source"]),
                deployment=str(body["deployment"]),
                revision=int(body["revision"]),
                stream=stream,
                start=int(body["start"]),
                end=int(body["end"]),
                lines=lines,
                group=_storable(group),
                image=_storable(image),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"not a log batch: {exc}") from None
        if not batch.source or batch.end < batch.start:
            raise ValueError("not a log batch: empty source or end before start")
        return batch


def split_lines(
    data: bytes, start: int, at: datetime, *, final: bool = False
) -> tuple[list[Line], int]:
    """The complete lines of ``data`` (which begins at position ``start`` of a source),
    and the position after the last byte used.

    A line ends at ``\\n``; a line longer than :data:`MAX_LINE_BYTES` is cut into pieces
    of that size (``cut`` true on all but the last), so the pieces depend only on the
    bytes and a re-read yields the same offsets. An unterminated rest is left for later,
    unless ``final`` (the writer is done or idle): then it is a line of its own.
    """
    lines: list[Line] = []
    pos = 0
    size = len(data)
    while pos < size:
        # A line of MAX_LINE_BYTES plus its newline is still one whole line.
        newline = data.find(b"\n", pos, pos + MAX_LINE_BYTES + 1)
        if newline != -1:
            lines.append(Line(start + pos, at, clean_text(data[pos : newline + 1])))
            pos = newline + 1
        elif size - pos > MAX_LINE_BYTES:
            piece = data[pos : pos + MAX_LINE_BYTES]
            lines.append(Line(start + pos, at, clean_text(piece, strip=False), cut=True))
            pos += MAX_LINE_BYTES
        elif final:
            lines.append(Line(start + pos, at, clean_text(data[pos:])))
            pos = size
        else:
            break
    return lines, start + pos


class LogPublisher(Protocol):
    """Where a shipper's batches go; returns once the batch is stored durably."""

    async def publish(self, batch: LogBatch) -> None:
        """Publishes one batch (raises when it was not acknowledged)."""
        ...


class JetStreamLogPublisher:
    """:class:`LogPublisher` on the ``LOGS`` stream: subject :attr:`LogBatch.subject`,
    ``Nats-Msg-Id`` :attr:`LogBatch.msg_id` (JetStream drops a batch published twice
    within its duplicate window), returning after JetStream's acknowledgement."""

    def __init__(self, js: JetStreamContext, *, timeout: float = 10.0) -> None:
        self.js = js
        self.timeout = timeout

    async def publish(self, batch: LogBatch) -> None:
        """Publishes and waits for JetStream's acknowledgement."""
        from shipyard_core.bus import LOGS_STREAM

        await self.js.publish(
            batch.subject,
            batch.encode(),
            stream=LOGS_STREAM,
            timeout=self.timeout,
            headers={"Nats-Msg-Id": batch.msg_id},
        )
