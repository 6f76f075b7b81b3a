"""Feeds a projection from JetStream: rows and positions in one transaction, then ack.

Guarantees, and how:
- nothing applied twice: each followed stream's last applied version is stored with the
  rows (``projection_positions``); an event at or below it is acknowledged and skipped;
- nothing applied out of order: an event more than one version ahead (its predecessor
  still on its way, e.g. a relay retry) is put back with a delay until the gap fills;
- poison is bounded: a handler that fails ``max_attempts`` times parks the message on the
  ``DLQ`` stream, records its version as handled, and the projection moves on;
- one writer: a session advisory lock elects the runner that applies; other replicas
  stand by and take over when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import FetchTimeoutError, NotFoundError
from opentelemetry import trace

from shipyard_core import db
from shipyard_core.aio import pause
from shipyard_core.bus import DLQ_STREAM, EVENTS_STREAM
from shipyard_core.db import Conn
from shipyard_core.eventstore import StoredEvent
from shipyard_core.metadata import causation_id_var, correlation_id_var
from shipyard_core.projections.base import Projection, Statement, execute_statements
from shipyard_core.telemetry import extract_context, tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

_INFRA_ERRORS = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)


@dataclass(frozen=True)
class ConsumerLag:
    """How far a consumer is behind."""

    name: str
    pending: int
    ack_pending: int
    redelivered: int
    dead_lettered: int
    applied: int


@dataclass
class _Item:
    msg: Msg
    event: StoredEvent


class ProjectionRunner:
    """Runs one projection until stopped."""

    def __init__(
        self,
        projection: Projection,
        dsn: str,
        js: JetStreamContext,
        *,
        batch_size: int = 256,
        max_attempts: int = 5,
        ack_wait: float = 30.0,
        retry_delay: float = 0.2,
    ) -> None:
        self.projection = projection
        self.dsn = dsn
        self.js = js
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.ack_wait = ack_wait
        self.retry_delay = retry_delay
        # Schema-qualified: two services may each have a projection called "usage".
        self.durable = f"proj_{projection.schema}_{projection.name}"
        self.tables = projection.live_tables()
        self.schema = projection.schema
        self.leader = False
        self.applied = 0

    # -- lifecycle -------------------------------------------------------------------

    async def ensure_consumer(self) -> None:
        """Creates the durable consumer (from the first event) if it does not exist, and
        widens an existing one that follows fewer subjects than the projection: a release
        whose projection follows a new aggregate updates the consumer in place (it keeps
        its position and pending acks; the new aggregate's events come after it). It is
        never narrowed."""
        config = ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,  # bounded by max_attempts here, so gaps can wait indefinitely
            max_ack_pending=self.batch_size * 4,
            filter_subjects=self.projection.subjects(),
        )
        try:
            info = await self.js.consumer_info(EVENTS_STREAM, self.durable)
        except NotFoundError:
            await self.js.add_consumer(EVENTS_STREAM, config)
            return
        have = set(info.config.filter_subjects or [info.config.filter_subject or ""])
        want = set(config.filter_subjects or ())
        # Only ever widened: during a rolling upgrade an older replica starting up must
        # not narrow it back (the leader would then pull past the new subjects' events).
        if want > have:
            log.info(
                "projection %s now follows %s (was %s)",
                self.projection.name,
                ", ".join(sorted(want)),
                ", ".join(sorted(have)),
            )
            await self.js.add_consumer(EVENTS_STREAM, config)  # create or update

    async def run(self, stop: asyncio.Event) -> None:
        """Applies events until ``stop`` is set; survives database and broker outages."""
        while not stop.is_set():
            try:
                await self._lead(stop)
            except _INFRA_ERRORS as exc:
                log.warning("projection %s lost a connection: %s", self.projection.name, exc)
                self.leader = False
                await pause(stop, 1.0)

    async def _lead(self, stop: asyncio.Event) -> None:
        conn = await db.connect(self.dsn)
        try:
            await self.projection.create_tables(conn)
            key = leader_lock_key(self.projection)
            while not stop.is_set():
                if await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
                    break
                await pause(stop, 1.0)
            if stop.is_set():
                return
            self.leader = True
            await self.ensure_consumer()
            sub = await self.js.pull_subscribe_bind(self.durable, stream=EVENTS_STREAM)
            try:
                while not stop.is_set():
                    msgs = await self._fetch(sub)
                    if msgs:
                        await self._process(conn, msgs)
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
        # waiting for a full batch (that would add latency under a trickle of events).
        if first and first[0].metadata.num_pending > 0:
            with contextlib.suppress(TimeoutError, FetchTimeoutError):
                first += await sub.fetch(self.batch_size - 1, timeout=0.05)
        return first

    # -- applying --------------------------------------------------------------------

    async def _process(self, conn: Conn, msgs: list[Msg]) -> None:
        items: list[_Item] = []
        for msg in msgs:
            try:
                event = self.projection.upcasters.upcast(StoredEvent.decode(msg.data))
            except ValueError as exc:
                await self._dead_letter(conn, msg, None, f"undecodable: {exc}")
                continue
            items.append(_Item(msg, event))
        if not items:
            return
        # One consumer span per batch, linked to each event's producing trace (carried in
        # the `traceparent` header), as OpenTelemetry's messaging conventions do for batches.
        links = []
        for item in items:
            ctx = trace.get_current_span(extract_context(item.msg.headers)).get_span_context()
            if ctx.is_valid:
                links.append(trace.Link(ctx))
        with _tracer.start_as_current_span(
            f"project {self.projection.name}",
            kind=trace.SpanKind.CONSUMER,
            links=links,
            attributes={"messaging.batch.message_count": len(items)},
        ):
            await self._process_items(conn, items)

    async def _process_items(self, conn: Conn, items: list[_Item]) -> None:
        try:
            done, rest = await self._apply(conn, items)
        except _INFRA_ERRORS:
            raise
        except Exception:  # a handler or statement failed: isolate it one by one
            log.debug("batch failed for %s; retrying singly", self.projection.name, exc_info=True)
            await self._process_singly(conn, items)
            return
        await asyncio.gather(*(i.msg.ack() for i in done))
        await self._requeue(rest)

    async def _process_singly(self, conn: Conn, items: list[_Item]) -> None:
        # One failing event must not hold the others: it is retried (or parked) alone, and
        # later events of its stream wait for it through the gap check.
        for item in items:
            try:
                done, rest = await self._apply(conn, [item])
            except _INFRA_ERRORS:
                raise
            except Exception as exc:
                if item.msg.metadata.num_delivered >= self.max_attempts:
                    await self._dead_letter(conn, item.msg, item.event, _describe(exc))
                    continue
                log.warning(
                    "projection %s failed on %s v%d (attempt %d): %s",
                    self.projection.name,
                    item.event.stream_id,
                    item.event.version,
                    item.msg.metadata.num_delivered,
                    _describe(exc),
                )
                await self._requeue([item])
                continue
            for d in done:
                await d.msg.ack()
            await self._requeue(rest)

    async def _apply(self, conn: Conn, items: list[_Item]) -> tuple[list[_Item], list[_Item]]:
        """Applies what it can in one transaction; returns (handled, to retry later)."""
        name = self.projection.name
        streams = list({i.event.stream_id for i in items})
        statements: list[Statement] = []
        done: list[_Item] = []
        rest: list[_Item] = []
        changed: dict[str, int] = {}
        applied = 0
        async with conn.transaction():
            # Replay's swap takes the same lock, so it never interleaves with a batch.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                f"shipyard.projection.apply.{self.schema}.{name}",
            )
            rows = await conn.fetch(
                f"SELECT stream_id, version FROM {self.schema}.projection_positions "
                "WHERE projection = $1 AND stream_id = ANY($2::text[]) FOR UPDATE",
                name,
                streams,
            )
            positions = {r["stream_id"]: r["version"] for r in rows}
            # Apply in per-stream order even when the batch is not: an event whose
            # predecessor comes later in the batch is retried after it; one whose
            # predecessor is not in the batch at all goes back to wait for it.
            pending = items
            while pending:
                deferred: list[_Item] = []
                progressed = False
                for item in pending:
                    ev = item.event
                    current = positions.get(ev.stream_id, 0)
                    if ev.version <= current:
                        done.append(item)  # applied before (redelivery or replay): skip
                    elif ev.version > current + 1:
                        deferred.append(item)
                    else:
                        correlation_id_var.set(str(ev.metadata.get("correlation_id") or ""))
                        causation_id_var.set(str(ev.event_id))
                        statements.extend(self.projection.handle(ev))
                        positions[ev.stream_id] = ev.version
                        changed[ev.stream_id] = ev.version
                        applied += 1
                        done.append(item)
                        progressed = True
                if not progressed:
                    rest = deferred
                    break
                pending = deferred
            for item in rest:
                log.info(
                    "projection %s waits for %s v%d before v%d",
                    name,
                    item.event.stream_id,
                    positions.get(item.event.stream_id, 0) + 1,
                    item.event.version,
                )
            await execute_statements(conn, statements, self.tables)
            await self._save_positions(conn, changed, applied=applied)
        self.applied += applied
        return done, rest

    async def _save_positions(
        self, conn: Conn, changed: dict[str, int], applied: int, dead: int = 0
    ) -> None:
        name = self.projection.name
        if changed:
            await conn.executemany(
                f"INSERT INTO {self.schema}.projection_positions (projection, stream_id, version) "
                "VALUES ($1, $2, $3) ON CONFLICT (projection, stream_id) "
                "DO UPDATE SET version = EXCLUDED.version",
                [(name, sid, v) for sid, v in changed.items()],
            )
        if applied or dead:
            await conn.execute(
                f"INSERT INTO {self.schema}.projection_stats AS s "
                "(projection, applied, dead_lettered) VALUES ($1, $2, $3) "
                "ON CONFLICT (projection) DO UPDATE SET applied = s.applied + $2, "
                "dead_lettered = s.dead_lettered + $3, updated_at = now()",
                name,
                applied,
                dead,
            )

    async def _requeue(self, items: list[_Item]) -> None:
        for item in items:
            await item.msg.nak(delay=self.retry_delay)

    async def _dead_letter(
        self, conn: Conn, msg: Msg, event: StoredEvent | None, reason: str
    ) -> None:
        """Parks a message on the DLQ stream, records it as handled, then acks it."""
        name = self.projection.name
        headers = dict(msg.headers or {})
        headers.update(
            {
                "Shipyard-Consumer": f"{self.schema}.{name}",
                "Shipyard-Error": reason[:1000],
                "Shipyard-Deliveries": str(msg.metadata.num_delivered),
                "Nats-Msg-Id": f"{headers.get('Nats-Msg-Id', msg.reply)}:{name}",
            }
        )
        await self.js.publish(
            f"dlq.{self.schema}.{name}", msg.data, stream=DLQ_STREAM, headers=headers
        )
        async with conn.transaction():
            changed = {event.stream_id: event.version} if event else {}
            await self._save_positions(conn, changed, applied=0, dead=1)
        log.error("projection %s dead-lettered a message: %s", name, reason)
        await msg.ack()

    # -- observation -----------------------------------------------------------------

    async def lag(self, conn: Conn | None = None) -> ConsumerLag:
        """Pending and in-flight messages of the consumer, and what was parked."""
        info = await self.js.consumer_info(EVENTS_STREAM, self.durable)
        stats = None
        if conn is not None:
            stats = await conn.fetchrow(
                f"SELECT applied, dead_lettered FROM {self.schema}.projection_stats "
                "WHERE projection = $1",
                self.projection.name,
            )
        return ConsumerLag(
            name=self.projection.name,
            pending=int(info.num_pending or 0),
            ack_pending=int(info.num_ack_pending or 0),
            redelivered=int(info.num_redelivered or 0),
            dead_lettered=int(stats["dead_lettered"]) if stats else 0,
            applied=int(stats["applied"]) if stats else self.applied,
        )


def leader_lock_key(projection: Projection | type[Projection]) -> str:
    """The session advisory lock the applying runner of ``projection`` holds."""
    return f"shipyard.projection.leader.{projection.schema}.{projection.name}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
