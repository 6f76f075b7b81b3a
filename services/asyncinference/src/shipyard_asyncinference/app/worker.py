"""Workers: pull lots of requests from the ``ASYNC`` work queue and run them.

The lots of one fetch are worked as a batch: their requests are marked running (a new
attempt each, saved with the concurrency check) in one statement while their payloads
are read, and each lot runs through the gateway in one call (the model server's batch
route; at most ``concurrency`` calls at a time per worker). Each outcome
is settled as soon as it is there, with whatever else finished meanwhile: their results
stored in one statement, once; a slow request holds back neither the others' results nor
their slots. A lot's message is acknowledged once every request of it is settled. While
the calls run the worker tells JetStream it is still at it (every third of the ack
wait), so only a dead worker's messages are redelivered. A failed attempt is recorded
and the lot's message redelivered after a back-off (its ended requests are then skipped)
until the request's attempts are used up. Every replica's workers share the one durable
consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError

from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.adapters.gateway import Outcome
from shipyard_asyncinference.app.commands import AsyncCommands, Result, Started
from shipyard_asyncinference.domain import AsyncLot, AsyncRequest
from shipyard_core.aio import pause
from shipyard_core.bus import DLQ_STREAM
from shipyard_core.errors import NotFound

log = logging.getLogger(__name__)

_INFRA_ERRORS = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)


class Runner(Protocol):
    """Runs attempts (:class:`~shipyard_asyncinference.adapters.gateway.GatewayRunner`)."""

    async def run_batch(self, runs: Sequence[tuple[AsyncRequest, bytes]]) -> list[Outcome]:
        """The outcome of one attempt of each ``(request, payload)`` (one deployment's)."""
        ...


CALL_MAX_BYTES = 1 << 20
"""The most payload bytes one model call carries (a larger payload goes alone)."""


class CallSizes:
    """How many requests a model call of each deployment carries: sized from the time
    per request its last answered call took, so that a call takes about ``budget``
    seconds at most (a slow model's call must neither time out because it carries many
    requests nor hold a model server process long), between 1 and ``most``; halved after
    a call that broke as a whole. A deployment not called yet gets ``first``."""

    def __init__(self, most: int, budget: float, first: int = 8) -> None:
        self.most = most
        self.budget = budget
        self.first = min(first, most)
        self._sizes: dict[str, int] = {}

    def size(self, deployment: str) -> int:
        """Requests the next call of ``deployment`` may carry."""
        return self._sizes.get(deployment, self.first)

    def observe(self, deployment: str, requests: int, seconds: float) -> None:
        """A call of ``requests`` requests was answered in ``seconds``."""
        per_request = max(seconds, 1e-6) / max(requests, 1)
        self._sizes[deployment] = max(1, min(self.most, int(self.budget / per_request)))

    def shrink(self, deployment: str, requests: int) -> None:
        """A call of ``requests`` requests broke as a whole: the next one carries half
        (until an answered call measures the time per request again)."""
        self._sizes[deployment] = max(1, min(self.size(deployment), requests // 2))


class Worker:
    """Runs lots of requests from the queue: ``concurrency`` lots, and as many model
    calls, at a time."""

    def __init__(
        self,
        commands: AsyncCommands,
        js: JetStreamContext,
        runner: Runner,
        *,
        concurrency: int,
        batch_size: int = 64,
        call_budget_seconds: float = 30.0,
        ack_wait_seconds: float,
        retry_delay_seconds: float,
        name: str = "",
    ) -> None:
        self.commands = commands
        self.js = js
        self.runner = runner
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.ack_wait = ack_wait_seconds
        self.retry_delay = retry_delay_seconds
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.running = 0
        """Lots taken and not settled."""
        self.calls = asyncio.Semaphore(concurrency)
        self.sizes = CallSizes(batch_size, call_budget_seconds)
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
                free = self.concurrency - self.running
                if free <= 0:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await sub.fetch(min(free, self.batch_size), timeout=1.0)
                except (TimeoutError, FetchTimeoutError):
                    continue
                self.running += len(msgs)
                task = asyncio.ensure_future(self._handle(msgs))
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

    async def _heartbeat(self, batch: _Batch) -> None:
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            # Only the messages still open: a progress report on a nak'd one would undo
            # its back-off (the server restarts its ack wait).
            for msg in list(batch.open.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _handle(self, msgs: list[Msg]) -> None:
        batch = _Batch(self, len(msgs))
        members: dict[str, list[str]] = {}
        try:
            for msg in msgs:
                try:
                    lot_id, ids = queue.lot_of_message(msg.data)
                except ValueError as exc:
                    await self._dead_letter(msg, str(exc))
                    batch.release(1)
                    continue
                if lot_id in batch.open:
                    await msg.ack()  # the same lot twice: the first message covers it
                    batch.release(1)
                    continue
                batch.open[lot_id] = msg
                members[lot_id] = ids
            if not batch.open:
                return
            beat = asyncio.ensure_future(self._heartbeat(batch))
            try:
                await self._process(batch, members)
            except Exception as exc:
                # Left unacknowledged: redelivered after the ack wait, to this or another
                # worker, which then decides from the requests' state.
                log.warning(
                    "async lots %s: worker error: %s",
                    ", ".join(list(batch.open)[:5]),
                    exc,
                    exc_info=True,
                )
            finally:
                beat.cancel()
        finally:
            batch.release(batch.held)

    async def _process(self, batch: _Batch, members: dict[str, list[str]]) -> None:
        ids = list(batch.open)
        started = await self.commands.start_many([(i, members[i]) for i in ids], self.name)
        lots: dict[str, AsyncLot] = {}
        runs: list[Started] = []
        for lot_id, lot_runs in zip(ids, started, strict=True):
            if lot_runs:
                lots[lot_id] = lot_runs[0].lot
                batch.expect(lot_id, len(lot_runs))
                runs.extend(lot_runs)
            else:
                await batch.ack(lot_id)  # all ended (or given up): nothing to do
        if self.on_start is not None:
            for run in runs:
                await self.on_start(run.request.id, run.attempt)
        # Each outcome is settled as soon as it is there, with whatever else finished
        # meanwhile: a slow call does not hold the others' results back.
        finished: asyncio.Queue[tuple[Started, Outcome | BaseException]] = asyncio.Queue()

        async def call(chunk: list[Started]) -> list[tuple[Started, Outcome | BaseException]]:
            bodies = await asyncio.gather(
                *(self.commands.payload(run) for run in chunk), return_exceptions=True
            )
            out: list[tuple[Started, Outcome | BaseException]] = []
            ready: list[tuple[Started, bytes]] = []
            for run, body in zip(chunk, bodies, strict=True):
                if isinstance(body, BaseException):
                    out.append((run, body))
                else:
                    ready.append((run, body))
            if not ready:
                return out
            deployment = chunk[0].request.deployment
            async with self.calls:
                began = time.monotonic()
                outcomes = await self._call(ready)
                took = time.monotonic() - began
            if len(ready) > 1 and _broken_whole(outcomes):
                # The exchange with the model server broke or timed out: perhaps one
                # request's doing. Each alone, so it fails none of its neighbours.
                self.sizes.shrink(deployment, len(ready))
                outcomes = list(await asyncio.gather(*(self._alone(run) for run in ready)))
            elif _answered(outcomes):
                self.sizes.observe(deployment, len(ready), took)
            out.extend((run, outcome) for (run, _), outcome in zip(ready, outcomes, strict=True))
            return out

        async def settled_call(chunk: list[Started]) -> None:
            # Whatever happens, each run of the chunk reaches `finished` (else the loop
            # below would wait for it, and its message stay alive, forever).
            try:
                outcomes = await call(chunk)
            except Exception as exc:
                outcomes = [(run, exc) for run in chunk]
            for item in outcomes:
                finished.put_nowait(item)

        calls = [asyncio.ensure_future(settled_call(chunk)) for chunk in self._chunks(runs)]
        try:
            left = len(runs)
            while left:
                ready = [await finished.get()]
                while not finished.empty():
                    ready.append(finished.get_nowait())
                left -= len(ready)
                await self._settle(batch, lots, ready)
        finally:
            for task in calls:
                task.cancel()

    async def _call(self, ready: Sequence[tuple[Started, bytes]]) -> list[Outcome | BaseException]:
        try:
            got = await self.runner.run_batch([(run.request, body) for run, body in ready])
        except Exception as exc:
            return [exc] * len(ready)
        return list(got)

    async def _alone(self, run: tuple[Started, bytes]) -> Outcome | BaseException:
        async with self.calls:
            return (await self._call([run]))[0]

    def _chunks(self, runs: list[Started]) -> list[list[Started]]:
        """The model calls of ``runs``: per lot, up to :class:`CallSizes` requests and
        :data:`CALL_MAX_BYTES` of payloads each. (Lots of a fetch go in calls of their
        own: a slow call holds back its own lot only.)"""
        calls: list[list[Started]] = []
        by_lot: dict[str, tuple[list[Started], int]] = {}
        for run in runs:
            size = run.request.payload_bytes
            most = self.sizes.size(run.request.deployment)
            chunk, used = by_lot.get(run.lot.id, ([], 0))
            if chunk and (len(chunk) >= most or used + size > CALL_MAX_BYTES):
                chunk, used = [], 0
            if not chunk:
                calls.append(chunk)
            chunk.append(run)
            by_lot[run.lot.id] = (chunk, used + size)
        return calls

    async def _settle(
        self,
        batch: _Batch,
        lots: dict[str, AsyncLot],
        ready: list[tuple[Started, Outcome | BaseException]],
    ) -> None:
        """Records what finished: results in one write, failures one by one. A request
        whose outcome cannot be recorded leaves its lot's message unacknowledged
        (redelivered)."""
        results: list[Result] = []
        for run, outcome in ready:
            lot_id = run.lot.id
            request_id = run.request.id
            if isinstance(outcome, NotFound):
                await batch.settled(lot_id)  # its payload was removed: nothing to run
            elif isinstance(outcome, BaseException):
                log.warning("async request %s: worker error: %s", request_id, outcome)
                await batch.settled(lot_id, leave=True)
            elif outcome.ok:
                results.append(
                    Result(
                        lot_id,
                        run.request,
                        run.attempt,
                        outcome.status,
                        outcome.content_type,
                        outcome.body,
                    )
                )
            else:
                try:
                    again = await self.commands.fail_attempt(
                        lots,
                        lot_id,
                        run.request,
                        run.attempt,
                        outcome.error,
                        final=outcome.final,
                        worker=self.name,
                    )
                except Exception as exc:
                    log.warning("async request %s: cannot record its failure: %s", request_id, exc)
                    await batch.settled(lot_id, leave=True)
                    continue
                delay = self.retry_delay * 2 ** (run.attempt - 1) if again else None
                await batch.settled(lot_id, retry_after=delay)
        if not results:
            return
        try:
            stored = await self.commands.complete_many(lots, results, self.name)
        except Exception as exc:
            log.warning("async requests: cannot store %d results: %s", len(results), exc)
            for result in results:
                await batch.settled(result.lot_id, leave=True)
            return
        for result, ok in zip(results, stored, strict=True):
            request_id = result.request.id
            if ok is False:
                log.info("async request %s: attempt %d lost to another", request_id, result.attempt)
            # None: its result could not be staged: run it again later.
            await batch.settled(result.lot_id, leave=ok is None)

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


def _broken_whole(outcomes: Sequence[Outcome | BaseException]) -> bool:
    """Whether a call failed as a whole in a way one of its requests may have caused: the
    exchange with the model server timed out (504) or broke (502). Not a refusal of the
    whole (429, no instance, the deployment gone), which each request alone would get
    too."""
    first = outcomes[0]
    return isinstance(first, Outcome) and first.whole and first.status in (502, 504)


def _answered(outcomes: Sequence[Outcome | BaseException]) -> bool:
    """Whether the model server answered the call (each request its own answer)."""
    return all(isinstance(o, Outcome) and not o.whole for o in outcomes)


class _Batch:
    """The open messages of one fetch, by lot id, and what each lot still runs. A lot's
    message is settled when its last request is: acknowledged, or asked for again after
    the longest back-off its failed attempts want, or left unacknowledged (redelivered
    after the ack wait) when a request's outcome could not be recorded. Each message
    holds one unit of the worker's ``running`` until then."""

    def __init__(self, worker: Worker, held: int) -> None:
        self.worker = worker
        self.held = held
        """Units of ``worker.running`` this batch holds (its messages not settled)."""
        self.open: dict[str, Msg] = {}
        self._runs: dict[str, int] = {}
        self._retry: dict[str, float] = {}
        self._leave: set[str] = set()

    def release(self, units: int) -> None:
        """Gives back ``units`` of the worker's running count."""
        self.held -= units
        self.worker.running -= units

    def expect(self, lot_id: str, runs: int) -> None:
        """The lot runs ``runs`` requests."""
        self._runs[lot_id] = runs

    async def settled(
        self, lot_id: str, *, leave: bool = False, retry_after: float | None = None
    ) -> None:
        """One request of the lot is settled; the lot's message too when it was the last."""
        if leave:
            self._leave.add(lot_id)
        if retry_after is not None:
            self._retry[lot_id] = max(retry_after, self._retry.get(lot_id, 0.0))
        self._runs[lot_id] -= 1
        if self._runs[lot_id]:
            return
        msg = self.open.pop(lot_id, None)
        if msg is None:
            return
        self.release(1)
        if lot_id in self._leave:
            return
        if lot_id in self._retry:
            await msg.nak(delay=self._retry[lot_id])
        else:
            await msg.ack()

    async def ack(self, lot_id: str) -> None:
        """Acknowledges a lot with nothing to run."""
        msg = self.open.pop(lot_id, None)
        if msg is not None:
            self.release(1)
            await msg.ack()
