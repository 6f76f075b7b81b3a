"""The outbox relay: publishes committed events to JetStream in commit order.

Crash safety: rows are deleted only after JetStream acknowledged them, and every
message carries ``Nats-Msg-Id`` = event id, so a relay killed between publishing and
deleting republishes duplicates that JetStream drops (and that consumers would skip by
stream version anyway). Only one relay per service publishes at a time (an advisory
lock), so replicas can run for availability without reordering events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import asyncpg
from nats.js import JetStreamContext

from shipyard_core import db
from shipyard_core.aio import pause, wait_either
from shipyard_core.db import Conn
from shipyard_core.eventstore.schema import validate_identifier
from shipyard_core.eventstore.store import outbox_channel

log = logging.getLogger(__name__)


class OutboxRelay:
    """Moves a service's outbox rows to JetStream."""

    def __init__(
        self,
        dsn: str,
        js: JetStreamContext,
        service: str,
        *,
        batch_size: int = 512,
        poll_interval: float = 0.5,
    ) -> None:
        self.dsn = dsn
        self.js = js
        self.service = validate_identifier(service)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.published = 0
        self._wake = asyncio.Event()
        s = self.service
        self._select = (
            f"SELECT position, subject, headers, body FROM {s}.outbox "
            "WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) "
            "ORDER BY tx_id, position LIMIT $1"
        )
        self._delete = f"DELETE FROM {s}.outbox WHERE position = ANY($1::bigint[])"

    async def run(self, stop: asyncio.Event) -> None:
        """Relays until ``stop`` is set; reconnects after database or broker failures."""
        while not stop.is_set():
            try:
                await self._lead(stop)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("outbox relay for %s lost its connection: %s", self.service, exc)
                await pause(stop, 1.0)

    async def _lead(self, stop: asyncio.Event) -> None:
        conn = await db.connect(self.dsn)
        try:
            await conn.add_listener(outbox_channel(self.service), self._on_notify)
            key = f"shipyard.outbox.{self.service}"
            while not stop.is_set():
                if await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
                    break
                await pause(stop, 1.0)  # another replica relays; stand by
            while not stop.is_set():
                self._wake.clear()
                moved = await self.relay_once(conn)
                if moved == 0:
                    # Woken by NOTIFY from an appending transaction's commit, or poll:
                    # rows can be committed yet still hidden behind an older open xmin.
                    await wait_either(stop, self._wake, self.poll_interval)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, _payload: object) -> None:
        self._wake.set()

    async def relay_once(self, conn: Conn) -> int:
        """Publishes one batch of committed rows and deletes them; returns how many."""
        rows = await conn.fetch(self._select, self.batch_size)
        if not rows:
            return 0
        # Publish concurrently: one connection keeps them in order on the server, and
        # waiting for each ack in turn would cost a round trip (and an fsync) per event.
        acks = [
            self.js.publish(
                r["subject"],
                bytes(r["body"]),
                headers=_headers(r["headers"]),
            )
            for r in rows
        ]
        await asyncio.gather(*acks)
        await conn.execute(self._delete, [r["position"] for r in rows])
        self.published += len(rows)
        return len(rows)

    async def pending(self, conn: Conn) -> int:
        """Rows waiting to be published."""
        return int(await conn.fetchval(f"SELECT count(*) FROM {self.service}.outbox"))


def _headers(raw: Any) -> dict[str, str]:
    data = raw if isinstance(raw, dict) else json.loads(raw)
    return {str(k): str(v) for k, v in data.items()}
