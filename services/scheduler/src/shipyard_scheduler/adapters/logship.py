"""Log shipping: instances' output to the ``LOGS`` stream, for the logging service.

The interface is small so that every runtime backend can have a shipper of its own:
a shipper turns a source's log into consecutive :class:`~shipyard_core.logbatch.LogBatch`
messages (positions ``[start, end)``, increasing) and hands each to a
:class:`LogPublisher`, remembering how far it got only after the publish was
acknowledged. Here: :class:`LocalLogShipper` tails the local backend's files (byte
offsets). A Kubernetes shipper would follow pod logs (``read_namespaced_pod_log`` with
``follow``/``since_time``; a line counter or the kubelet's timestamp as the position,
kept in a ConfigMap or the scheduler's schema) and publish through the same
:class:`LogPublisher` — or leave shipping to a node agent (Fluent Bit) that publishes
the same message format. See docs/decisions/0024-logs.md.

Crash safety of the local shipper: positions are saved (atomically, in
``<logs>/.shipped.json``) after JetStream acknowledged the batch. A scheduler killed in
between re-sends the batch when it restarts: the same range has the same
``Nats-Msg-Id`` (JetStream drops it), and a longer range is trimmed by the logging
service, which skips lines below the position it has stored for the instance.

stdout and stderr: the local backend writes both into one file, in write order, so
lines are tagged ``output`` (splitting them would lose their relative order; a pod
shipper tags ``stdout``/``stderr`` as the kubelet reports them).

Timestamps: the local files hold bare lines, so a line is stamped (UTC) when the
shipper reads it, normally within ``interval`` seconds of being written; lines written
while no scheduler ran are stamped when it starts again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shipyard_core.aio import pause
from shipyard_core.logbatch import (
    MAX_BATCH_BYTES,
    LogBatch,
    LogPublisher,
    split_lines,
)

log = logging.getLogger(__name__)

POSITIONS_FILE = ".shipped.json"
# Instance ids of the local backend: <deployment>-r<revision>-<suffix>.
_INSTANCE = re.compile(r"^(?P<deployment>[a-z][a-z0-9-]*?)-r(?P<revision>\d+)-[a-z0-9]+$")


@dataclass
class _Tracked:
    size: int = -1
    changed: float = 0.0


def parse_instance_id(instance_id: str) -> tuple[str, int] | None:
    """``(deployment, revision)`` of a local instance id, or None."""
    match = _INSTANCE.match(instance_id)
    if match is None:
        return None
    return match.group("deployment"), int(match.group("revision"))


class LocalLogShipper:
    """Ships every ``<logs_dir>/<instance>.log`` of the local backend to ``publisher``.

    Polls the files every ``interval`` seconds and sends what was appended since the last
    acknowledged position, in batches of whole lines (at most ``MAX_BATCH_BYTES`` each).
    An unterminated last line is sent once the file did not grow for ``idle_flush``
    seconds (a process that died mid-line, or prints a prompt).
    """

    def __init__(
        self,
        logs_dir: Path,
        publisher: LogPublisher,
        *,
        interval: float = 0.25,
        idle_flush: float = 2.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.logs_dir = logs_dir
        self.publisher = publisher
        self.interval = interval
        self.idle_flush = idle_flush
        self.clock = clock
        self.positions: dict[str, int] = {}
        self.shipped_lines = 0
        self._tracked: dict[str, _Tracked] = {}
        self._loaded = False
        self._skipped: set[str] = set()

    @property
    def positions_path(self) -> Path:
        """Where the acknowledged positions are kept."""
        return self.logs_dir / POSITIONS_FILE

    async def run(self, stop: asyncio.Event) -> None:
        """Ships until ``stop`` is set; a failed round (broker down) is retried."""
        while not stop.is_set():
            try:
                await self.ship_once()
            except Exception as exc:
                log.warning("log shipping paused: %s", exc)
                await pause(stop, 1.0)
            await pause(stop, self.interval)

    async def ship_once(self) -> int:
        """One round over every file; returns how many lines were shipped."""
        if not self._loaded:
            self.positions = await asyncio.to_thread(_load_positions, self.positions_path)
            self._loaded = True
        shipped = 0
        for path, size in await asyncio.to_thread(_scan, self.logs_dir):
            shipped += await self._ship_file(path, size)
        self.shipped_lines += shipped
        return shipped

    async def _ship_file(self, path: Path, size: int) -> int:
        instance = path.stem
        parsed = parse_instance_id(instance)
        if parsed is None:
            if instance not in self._skipped:
                self._skipped.add(instance)
                log.warning("not shipping %s: not an instance's log", path)
            return 0
        deployment, revision = parsed
        now = time.monotonic()
        tracked = self._tracked.setdefault(instance, _Tracked(size, now))
        if size != tracked.size:
            tracked.size, tracked.changed = size, now
        position = self.positions.get(instance, 0)
        if size < position:
            # Only appended to, ever; a shorter file was replaced: start over.
            log.warning("log %s shrank below its shipped position; shipping it anew", path)
            position = 0
        idle = now - tracked.changed >= self.idle_flush
        shipped = 0
        while position < size:
            data = await asyncio.to_thread(_read, path, position, MAX_BATCH_BYTES)
            if not data:
                break
            at_end = position + len(data) >= size
            lines, end = split_lines(data, position, self.clock(), final=at_end and idle)
            if not lines:
                break
            await self.publisher.publish(
                LogBatch("instance", instance, deployment, revision, "output", position, end, lines)
            )
            position = end
            self.positions[instance] = end
            await asyncio.to_thread(_save_positions, self.positions_path, dict(self.positions))
            shipped += len(lines)
        return shipped


def _scan(logs_dir: Path) -> list[tuple[Path, int]]:
    """Every instance log with its size now."""
    found = []
    for path in sorted(logs_dir.glob("*.log")):
        try:
            found.append((path, path.stat().st_size))
        except FileNotFoundError:
            continue
    return found


def _read(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def _load_positions(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        # Shipping everything again is safe: the logging service skips what it has.
        log.warning("unreadable log positions %s (%s): shipping every log anew", path, exc)
        return {}
    return {str(k): int(v) for k, v in dict(data).items()}


def _save_positions(path: Path, positions: dict[str, int]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(positions, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
