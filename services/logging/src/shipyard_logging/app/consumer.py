"""One JetStream consumer applied by one replica: the shape both ingesters share.

A session advisory lock in PostgreSQL elects the replica that consumes (the others
stand by and take over when it dies, as projection runners do); it pulls batches from
its durable consumer, writes them in one transaction and acks after the commit, and
every ``retention_interval`` seconds drops what is past the retention. Messages it cannot
read are parked on ``DLQ`` (``dlq.logging.<durable>``) and acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import FetchTimeoutError, NotFoundError

from shipyard_core import db
from shipyard_core.aio import pause
from shipyard_core.bus import DLQ_STREAM
from shipyard_core.db import Conn

log = logging.getLogger(__name__)

INFRA_ERRORS = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)


class LeaderConsumer(ABC):
    """Subclasses name the stream, durable, filter and lock, and write the messages."""

    stream: ClassVar[str]
    durable: ClassVar[str]
    filter_subject: ClassVar[str]
    what: ClassVar[str]
    """What it consumes, for log messages ("log ingest")."""

    def __init__(
        self,
        dsn: str,
        js: JetStreamContext,
        *,
        retention_interval: float = 600.0,
        batch_size: int = 256,
        ack_wait: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self.js = js
        self.retention_interval = retention_interval
        self.batch_size = batch_size
        self.ack_wait = ack_wait
        self.leader = False
        self.dead_lettered = 0
        self._next_retention = 0.0

    @property
    def leader_lock(self) -> str:
        """The advisory lock the consuming replica holds."""
        return f"shipyard.logging.{self.durable}.leader"

    async def ensure_consumer(self) -> None:
        """Creates the durable consumer (from the oldest retained message) if missing."""
        try:
            await self.js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            await self.js.add_consumer(
                self.stream,
                ConsumerConfig(
                    durable_name=self.durable,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=self.ack_wait,
                    max_deliver=-1,  # bounded here (gaps, poison), never by the server
                    max_ack_pending=self.batch_size * 4,
                    filter_subject=self.filter_subject,
                ),
            )

    async def pending(self) -> int:
        """Messages not yet delivered plus delivered and not yet acknowledged."""
        info = await self.js.consumer_info(self.stream, self.durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def run(self, stop: asyncio.Event) -> None:
        """Consumes until ``stop`` is set; survives database and broker outages."""
        while not stop.is_set():
            try:
                await self._lead(stop)
            except INFRA_ERRORS as exc:
                log.warning("%s lost a connection: %s", self.what, exc)
                self.leader = False
                await pause(stop, 1.0)

    async def _lead(self, stop: asyncio.Event) -> None:
        conn = await db.connect(self.dsn)
        try:
            while not stop.is_set():
                lock = self.leader_lock
                if await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock):
                    break
                await pause(stop, 1.0)
            if stop.is_set():
                return
            await self.prepare(conn)
            self.leader = True
            await self.ensure_consumer()
            sub = await self.js.pull_subscribe_bind(self.durable, stream=self.stream)
            try:
                while not stop.is_set():
                    if time.monotonic() >= self._next_retention:
                        self._next_retention = time.monotonic() + self.retention_interval
                        await self.drop_expired(conn)
                    msgs = await self._fetch(sub)
                    if msgs:
                        await self.process(conn, msgs)
                    else:
                        await self.idle(conn)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        finally:
            self.leader = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    async def _fetch(self, sub: Any) -> list[Msg]:
        try:
            first: list[Msg] = await sub.fetch(1, timeout=1.0)
        except (TimeoutError, FetchTimeoutError):
            return []
        # The long poll returns on the first message; drain what else is ready without
        # waiting for a full batch. ``num_pending`` counts only messages never delivered:
        # a redelivery (after a nak or a dead ingester's ack wait) likely has company.
        if first and (first[0].metadata.num_pending > 0 or first[0].metadata.num_delivered > 1):
            with contextlib.suppress(TimeoutError, FetchTimeoutError):
                first += await sub.fetch(self.batch_size - 1, timeout=0.05)
        return first

    @abstractmethod
    async def prepare(self, conn: Conn) -> None:
        """Runs once the replica leads, before the first message (tables, caches)."""

    @abstractmethod
    async def process(self, conn: Conn, msgs: list[Msg]) -> None:
        """Writes the messages and acks (or naks) each."""

    async def idle(self, conn: Conn) -> None:  # noqa: B027 - optional hook, no-op by default
        """Runs when a fetch found nothing (work held back can be retried here)."""

    @abstractmethod
    async def drop_expired(self, conn: Conn) -> list[str]:
        """Removes what is past the retention; returns the dropped partitions."""

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        """Parks ``msg`` on the DLQ stream, then acknowledges it."""
        headers = dict(msg.headers or {})
        headers.update(
            {
                "Shipyard-Consumer": f"logging.{self.durable}",
                "Shipyard-Error": reason[:1000],
                "Shipyard-Deliveries": str(msg.metadata.num_delivered),
                "Nats-Msg-Id": f"{headers.get('Nats-Msg-Id', msg.reply)}:{self.durable}",
            }
        )
        await self.js.publish(
            f"dlq.logging.{self.durable}", msg.data, stream=DLQ_STREAM, headers=headers
        )
        self.dead_lettered += 1
        log.error("%s dead-lettered a message: %s", self.what, reason)
        await msg.ack()
