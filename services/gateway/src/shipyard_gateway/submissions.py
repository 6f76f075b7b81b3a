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
from shipyard_core.grpckit.errors import error_from_status

SubmitManyCall = Callable[[Sequence[apb.SubmitRequest]], Awaitable[Sequence[apb.SubmitOutcome]]]
"""Sends one ``SubmitMany`` call; its outcomes, one per request, in order."""

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class SubmitCoalescer:
    """Submits through ``call``, several concurrent submissions per call."""

    def __init__(self, call: SubmitManyCall, *, max_batch: int = 64, max_in_flight: int = 2):
        self.call = call
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.calls = 0
        """How many calls were sent (a test and bench reading)."""
        self._pending: list[tuple[apb.SubmitRequest, asyncio.Future[apb.AsyncRequest]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, request: apb.SubmitRequest) -> apb.AsyncRequest:
        """The stored request; raises the domain error of a refusal or an outage."""
        future: asyncio.Future[apb.AsyncRequest] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if self._in_flight < self.max_in_flight:
            self._in_flight += 1
            task = asyncio.ensure_future(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                self.calls += 1
                try:
                    outcomes = await self.call([request for request, _ in batch])
                    if len(outcomes) != len(batch):
                        raise RuntimeError(
                            f"SubmitMany answered {len(outcomes)} outcomes for {len(batch)}"
                        )
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
