"""Route change fan-out: one LISTEN connection per scheduler process turns the
projection's ``pg_notify`` into wake-ups for every ``WatchRoutes`` stream.

A watcher subscribes *before* it reads the snapshot, so a change committed between the
two is never missed (at worst it is sent twice, which is harmless: updates are whole
states, not deltas)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from shipyard_core import db
from shipyard_core.aio import pause
from shipyard_scheduler.app.queries import DeploymentQueries
from shipyard_scheduler.app.views import RouteView
from shipyard_scheduler.projections import ROUTES_CHANNEL

log = logging.getLogger(__name__)

ALL = "*"  # a subscriber must resend everything (the listener reconnected)


class _Subscriber:
    def __init__(self) -> None:
        self.names: set[str] = set()
        self.event = asyncio.Event()

    def push(self, name: str) -> None:
        self.names.add(name)
        self.event.set()

    async def take(self) -> set[str]:
        await self.event.wait()
        self.event.clear()
        names, self.names = self.names, set()
        return names


class RouteHub:
    """Listens for route changes and wakes the watchers."""

    def __init__(self, dsn: str, queries: DeploymentQueries) -> None:
        self.dsn = dsn
        self.queries = queries
        self._subscribers: set[_Subscriber] = set()
        self.listening = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Keeps the LISTEN connection up until ``stop``."""
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(self.dsn)
                await conn.add_listener(ROUTES_CHANNEL, self._on_notify)
                self.listening.set()
                self._broadcast(ALL)  # anything may have changed while we were away
                await stop.wait()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("route listener lost its connection: %s", exc)
                self.listening.clear()
                await pause(stop, 1.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        self._broadcast(str(payload))

    def _broadcast(self, name: str) -> None:
        for sub in self._subscribers:
            sub.push(name)

    async def watch(self) -> AsyncIterator[RouteView | None]:
        """Every deployment's routes, then None (synced), then each change."""
        sub = _Subscriber()
        self._subscribers.add(sub)
        try:
            for view in await self.queries.routes():
                yield view
            yield None
            while True:
                names = await sub.take()
                views = await self.queries.routes(None if ALL in names else sorted(names))
                for view in views:
                    yield view
        finally:
            self._subscribers.discard(sub)
