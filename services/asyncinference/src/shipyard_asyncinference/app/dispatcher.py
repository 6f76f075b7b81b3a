"""The policy that makes an accepted request reach the queue whatever crashes.

Submit publishes to ``ASYNC`` right after its commit (the fast path). Should the process
die in between, the ``AsyncRequestQueued`` event still reaches JetStream through the
outbox relay, and this policy (a durable consumer on ``EVENTS``) publishes it then. Both
publish with ``Nats-Msg-Id`` = request id, so JetStream keeps one message; a duplicate
beyond the window is harmless (the worker skips a request that ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import FetchTimeoutError, NotFoundError

from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.projections import SCHEMA
from shipyard_core.aio import pause
from shipyard_core.bus import EVENTS_STREAM
from shipyard_core.eventstore import StoredEvent

log = logging.getLogger(__name__)

DISPATCHER = "policy_asyncinference_dispatch"


class Dispatcher:
    """Publishes every queued request to the work queue."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.dispatched = 0

    async def ensure_consumer(self) -> None:
        """Creates the durable consumer (from the first event) if missing."""
        try:
            await self.js.consumer_info(EVENTS_STREAM, DISPATCHER)
        except NotFoundError:
            await self.js.add_consumer(
                EVENTS_STREAM,
                ConsumerConfig(
                    durable_name=DISPATCHER,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=30.0,
                    max_deliver=-1,
                    filter_subject=f"events.{SCHEMA}.async_request.*",
                ),
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatches until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.ensure_consumer()
                sub = await self.js.pull_subscribe_bind(DISPATCHER, stream=EVENTS_STREAM)
                try:
                    while not stop.is_set():
                        try:
                            msgs = await sub.fetch(256, timeout=1.0)
                        except (TimeoutError, FetchTimeoutError):
                            continue
                        for msg in msgs:
                            await self._handle(msg)
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
            except OSError as exc:
                log.warning("async dispatcher lost its connection: %s", exc)
                await pause(stop, 1.0)

    async def _handle(self, msg: Msg) -> None:
        try:
            event = StoredEvent.decode(msg.data)
        except ValueError:
            log.error("async dispatcher skips an undecodable event")
            await msg.ack()
            return
        if event.event_type == "AsyncRequestQueued":
            await queue.enqueue(self.js, event.aggregate_id, str(event.payload["deployment"]))
            self.dispatched += 1
        await msg.ack()
