"""Workers: pull request ids from the ``ASYNC`` work queue and run them.

For each message: mark the request running (a new attempt, saved with the concurrency
check), read its payload, run it through the gateway, store the result once, ack. While
the call runs the worker tells JetStream it is still at it (every third of the ack
wait), so only a dead worker's message is redelivered. A failed attempt is recorded and
the message redelivered after a back-off until the request's attempts are used up.
Every replica's workers share the one durable consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError

from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.adapters.gateway import Outcome
from shipyard_asyncinference.app.commands import AsyncCommands
from shipyard_asyncinference.domain import AsyncRequest
from shipyard_core.aio import pause
from shipyard_core.bus import DLQ_STREAM
from shipyard_core.errors import NotFound

log = logging.getLogger(__name__)

_INFRA_ERRORS = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)


class Runner(Protocol):
    """Runs one attempt (:class:`~shipyard_asyncinference.adapters.gateway.GatewayRunner`)."""

    async def run(self, agg: AsyncRequest, body: bytes) -> Outcome:
        """The outcome of one attempt of ``agg`` with payload ``body``."""
        ...


class Worker:
    """Runs requests from the queue, ``concurrency`` at a time."""

    def __init__(
        self,
        commands: AsyncCommands,
        js: JetStreamContext,
        runner: Runner,
        *,
        concurrency: int,
        ack_wait_seconds: float,
        retry_delay_seconds: float,
        name: str = "",
    ) -> None:
        self.commands = commands
        self.js = js
        self.runner = runner
        self.concurrency = concurrency
        self.ack_wait = ack_wait_seconds
        self.retry_delay = retry_delay_seconds
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.running = 0
        self.on_start: Callable[[str, int], Awaitable[None]] | None = None
        """Test hook, awaited once an attempt is recorded as started."""

    async def run(self, stop: asyncio.Event) -> None:
        """Works until ``stop`` is set; survives broker and database outages."""
        while not stop.is_set():
            try:
                await self._loop(stop)
            except _INFRA_ERRORS as exc:
                log.warning("async worker lost a connection: %s", exc)
                await pause(stop, 1.0)

    async def _loop(self, stop: asyncio.Event) -> None:
        sub = await self.js.pull_subscribe_bind(queue.WORKERS_CONSUMER, stream=queue.ASYNC_STREAM)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                free = self.concurrency - len(tasks)
                if free <= 0:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await sub.fetch(free, timeout=1.0)
                except (TimeoutError, FetchTimeoutError):
                    continue
                for msg in msgs:
                    task = asyncio.ensure_future(self._handle(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            # Requests in progress finish (the host cancels them after its grace period;
            # their messages are then redelivered to another worker).
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _heartbeat(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _handle(self, msg: Msg) -> None:
        try:
            request_id = queue.request_id_of(msg.data)
        except ValueError as exc:
            await self._dead_letter(msg, str(exc))
            return
        beat = asyncio.ensure_future(self._heartbeat(msg))
        self.running += 1
        try:
            await self._process(msg, request_id)
        except NotFound:
            await msg.ack()  # no such request: nothing to run
        except Exception as exc:
            # Left unacknowledged: redelivered after the ack wait, to this or another
            # worker, which then decides from the request's state.
            log.warning("async request %s: worker error: %s", request_id, exc, exc_info=True)
        finally:
            self.running -= 1
            beat.cancel()

    async def _process(self, msg: Msg, request_id: str) -> None:
        # The payload is read while the attempt is recorded: one round trip less between
        # the message and the model call.
        inline = asyncio.ensure_future(self.commands.inline_payload(request_id))
        try:
            started = await self.commands.start(request_id, self.name)
        except BaseException:
            inline.cancel()
            raise
        if started is None:
            inline.cancel()
            await msg.ack()  # ended (or given up): nothing to do
            return
        agg, attempt = started
        if self.on_start is not None:
            await self.on_start(request_id, attempt)
        body = await self.commands.payload(agg, await inline)
        outcome = await self.runner.run(agg, body)
        if outcome.ok:
            stored = await self.commands.complete(
                request_id,
                attempt,
                outcome.status,
                outcome.content_type,
                outcome.body,
                self.name,
                agg=agg,
            )
            if not stored:
                log.info("async request %s: attempt %d lost to another", request_id, attempt)
            await msg.ack()
            return
        again = await self.commands.fail_attempt(
            request_id, attempt, outcome.error, final=outcome.final, worker=self.name
        )
        if again:
            await msg.nak(delay=self.retry_delay * 2 ** (attempt - 1))
        else:
            await msg.ack()

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        headers = dict(msg.headers or {})
        headers["Shipyard-Consumer"] = "asyncinference.workers"
        headers["Shipyard-Error"] = reason[:1000]
        headers.pop("Nats-Msg-Id", None)
        await self.js.publish(
            "dlq.asyncinference.workers", msg.data, stream=DLQ_STREAM, headers=headers
        )
        log.error("async worker dead-lettered a malformed queue message: %s", reason)
        await msg.ack()
