"""The sweeper: removes payloads and results of requests past their retention."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from shipyard_asyncinference.app.commands import AsyncCommands
from shipyard_asyncinference.app.queries import AsyncQueries
from shipyard_core.aio import pause

log = logging.getLogger(__name__)


class Sweeper:
    """Expires requests every ``interval`` seconds (every replica may run one: a lost
    race is a no-op)."""

    def __init__(self, commands: AsyncCommands, queries: AsyncQueries, interval: float) -> None:
        self.commands = commands
        self.queries = queries
        self.interval = interval
        self.expired = 0

    async def sweep_once(self) -> int:
        """Expires what is due now; returns how many."""
        count = 0
        for request_id in await self.queries.due_for_expiry(datetime.now(UTC)):
            if await self.commands.expire(request_id):
                count += 1
        self.expired += count
        return count

    async def run(self, stop: asyncio.Event) -> None:
        """Sweeps until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.sweep_once()
            except Exception as exc:
                log.warning("async sweeper failed (retrying next round): %s", exc)
            await pause(stop, self.interval)
