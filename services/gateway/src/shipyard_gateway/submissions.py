"""Coalesces concurrent async submissions into ``SubmitMany`` calls.

An async submission is answered ``202`` only once the asyncinference service committed
it. One gRPC call and one transaction per submission cost far more than the request
itself, so submissions that arrive while a call is on its way wait for the next one and
go together: no timer, the first of a quiet moment leaves at once (a batch of one), and
under load each call takes what queued meanwhile (up to ``max_batch``). At most
``max_in_flight`` calls run at a time, so one batch's commit overlaps the next one's
encoding. Each submission still gets its own answer: its request, or the refusal a
``Submit`` of it alone would have had (decision 0034).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import grpc

from shipyard.asyncinference.v1 import asyncinference_pb2 as apb
from shipyard_core.errors import ResourceExhausted, Unavailable
from shipyard_core.grpckit.errors import error_from_status

SubmitManyCall = Callable[[Sequence[apb.SubmitRequest]], Awaitable[Sequence[apb.SubmitOutcome]]]
"""Sends one ``SubmitMany`` call; its outcomes, one per request, in order."""

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class SubmitCoalescer:
    """Submits through ``call``, several concurrent submissions per call."""

    def __init__(
        self,
        call: SubmitManyCall,
        *,
        max_batch: int = 64,
        max_bytes: int = 1024 * 1024,
        max_in_flight: int = 2,
    ) -> None:
        self.call = call
        self.max_batch = max_batch
        self.max_bytes = max_bytes
        """Bodies per call at most (a larger body goes alone): the gRPC message limit
        is one payload's, and one slow large upload should not hold small ones."""
        self.max_in_flight = max_in_flight
        self.calls = 0
        """How many calls were sent (a test and bench reading)."""
        self._pending: list[tuple[apb.SubmitRequest, asyncio.Future[apb.AsyncRequest]]] = []
        self._in_flight = 0
        self._alone = 0
        """How many of the first pending submissions go one per call (after a batch of
        them was too large as a whole)."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, request: apb.SubmitRequest) -> apb.AsyncRequest:
        """The stored request; raises the domain error of a refusal or an outage."""
        future: asyncio.Future[apb.AsyncRequest] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._start_drain()
        return await future

    def _start_drain(self) -> None:
        if self._pending and self._in_flight < self.max_in_flight:
            self._in_flight += 1
            task = asyncio.ensure_future(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[apb.SubmitRequest, asyncio.Future[apb.AsyncRequest]]]:
        batch: list[tuple[apb.SubmitRequest, asyncio.Future[apb.AsyncRequest]]] = []
        size = 0
        limit = 1 if self._alone else self.max_batch
        while self._pending and len(batch) < limit:
            request, future = self._pending[0]
            if future.done():  # its caller went away before it was sent: not sent
                self._pending.pop(0)
                continue
            if batch and size + len(request.body) > self.max_bytes:
                break
            self._pending.pop(0)
            batch.append((request, future))
            size += len(request.body)
        self._alone = max(0, self._alone - len(batch))
        return batch

    async def _drain(self) -> None:
        try:
            while batch := self._take():
                self.calls += 1
                try:
                    outcomes = await self.call([request for request, _ in batch])
                    if len(outcomes) != len(batch):
                        raise RuntimeError(
                            f"SubmitMany answered {len(outcomes)} outcomes for {len(batch)}"
                        )
                except asyncio.CancelledError:
                    # Shutting down: whoever still waits hears it (their requests may or
                    # may not be stored, as with any call cut off).
                    waiting = batch + self._pending
                    self._pending = []
                    for _, future in waiting:
                        if not future.done():
                            future.set_exception(
                                Unavailable("the gateway is shutting down; retry shortly")
                            )
                    raise
                except ResourceExhausted as exc:
                    if len(batch) > 1:
                        # The call as a whole was too large for the service (its message
                        # limit is one payload's): each goes alone instead.
                        self._pending[:0] = batch
                        self._alone += len(batch)
                        continue
                    if not batch[0][1].done():
                        batch[0][1].set_exception(exc)
                    continue
                except Exception as exc:  # the whole call failed: every waiter learns it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller went away; the request stands
                        continue
                    if outcome.code == 0:
                        future.set_result(outcome.request)
                    else:
                        code = _CODES.get(outcome.code, grpc.StatusCode.UNKNOWN)
                        future.set_exception(error_from_status(code, outcome.message))
        finally:
            self._in_flight -= 1
