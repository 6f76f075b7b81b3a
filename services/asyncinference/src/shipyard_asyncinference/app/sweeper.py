"""The sweeper: removes payloads and results of requests past their retention, and puts
back on the queue requests whose queue message was lost."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext

from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.app.commands import AsyncCommands
from shipyard_asyncinference.app.queries import AsyncQueries
from shipyard_core.aio import pause

log = logging.getLogger(__name__)


class Sweeper:
    """Every ``interval`` seconds: expires requests, and re-sends the queue message of a
    request queued (or running: its worker may have died too) for over
    ``redispatch_after`` seconds whose message is no longer in the ``ASYNC`` stream (the
    stream lost it: purged, restored from an older backup, a broker crash before its
    write reached the disk). Every replica may run one: a lost race is a no-op, a
    duplicate message is harmless (the worker decides from the request's state)."""

    def __init__(
        self,
        commands: AsyncCommands,
        queries: AsyncQueries,
        interval: float,
        js: JetStreamContext | None = None,
        redispatch_after: float = 300.0,
    ) -> None:
        self.commands = commands
        self.queries = queries
        self.interval = interval
        self.js = js
        self.redispatch_after = timedelta(seconds=redispatch_after)
        self.expired = 0
        self.redispatched = 0
        self._cursor: tuple[datetime, str] | None = None

    async def sweep_once(self) -> int:
        """Expires what is due now; returns how many lots."""
        count = 0
        due = await self.queries.due_for_expiry(datetime.now(UTC))
        lots = await self.commands.lots_of(due) if due else {}
        for lot_id in dict.fromkeys(lots.values()):
            if await self.commands.expire(lot_id):
                count += 1
        self.expired += count
        return count

    async def redispatch_once(self, page: int = 200) -> int:
        """Re-sends the lost queue messages of lots with requests queued (or running) for
        long; returns how many. Looks at ``page`` candidates per call, going on from where the
        previous call stopped, so a backlog of waiting requests whose messages are fine
        cannot hide one whose message is gone."""
        if self.js is None:
            return 0
        count = 0
        before = datetime.now(UTC) - self.redispatch_after
        candidates = await self.queries.waiting_since(before, self._cursor, page)
        # A short page means the end: the next call starts from the oldest again.
        self._cursor = (candidates[-1][0], candidates[-1][1]) if len(candidates) == page else None
        lot_of = (
            await self.commands.lots_of([rid for _, rid, _ in candidates]) if candidates else {}
        )
        lots = {lot_of[request_id]: deployment for _since, request_id, deployment in candidates}
        for lot_id, deployment in lots.items():
            if await queue.is_queued(self.js, lot_id, deployment):
                continue
            # A new message id: the lost one may still be in the duplicate window.
            msg_id = f"{lot_id}:redispatch:{time.time_ns()}"
            await queue.enqueue(self.js, lot_id, deployment, msg_id)
            log.warning("async lot %s had no queue message: sent again", lot_id)
            count += 1
        self.redispatched += count
        return count

    async def run(self, stop: asyncio.Event) -> None:
        """Sweeps until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.sweep_once()
                await self.redispatch_once()
            except Exception as exc:
                log.warning("async sweeper failed (retrying next round): %s", exc)
            await pause(stop, self.interval)
