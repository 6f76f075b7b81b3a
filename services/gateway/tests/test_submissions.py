"""The submission coalescer: concurrent async submissions share SubmitMany calls, and each
gets its own answer. (End to end, against the real service: the asyncinference suite's
burst test.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import grpc
import pytest

from shipyard.asyncinference.v1 import asyncinference_pb2 as apb
from shipyard_core.errors import ResourceExhausted, Unavailable
from shipyard_gateway.submissions import SubmitCoalescer


class _Service:
    """Answers each request with its deployment as the id; ``big`` ones are refused."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.down = False
        self.limit = 1 << 30

    async def submit_many(
        self, requests: Sequence[apb.SubmitRequest]
    ) -> Sequence[apb.SubmitOutcome]:
        self.batches.append([r.deployment for r in requests])
        await self.release.wait()
        if sum(len(r.body) for r in requests) > self.limit and len(requests) > 1:
            raise ResourceExhausted("Received message larger than max")
        if self.down:
            raise Unavailable("the async inference service is unavailable; retry shortly")
        out = []
        for r in requests:
            if r.deployment.startswith("big") or len(r.body) > self.limit:
                out.append(
                    apb.SubmitOutcome(
                        code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="too large"
                    )
                )
            else:
                out.append(apb.SubmitOutcome(request=apb.AsyncRequest(request_id=r.deployment)))
        return out


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_what_arrives_during_a_call_goes_in_the_next_one() -> None:
    service = _Service()
    coalescer = SubmitCoalescer(service.submit_many, max_batch=4, max_in_flight=1)
    service.release.clear()
    first = asyncio.ensure_future(coalescer.submit(apb.SubmitRequest(deployment="a0")))
    await _until(lambda: len(service.batches) == 1)  # the first call is on its way, alone
    rest = [
        asyncio.ensure_future(coalescer.submit(apb.SubmitRequest(deployment=f"a{i}")))
        for i in range(1, 7)
    ]
    await _until(lambda: len(coalescer._pending) == 6)
    assert service.batches == [["a0"]]  # nothing else leaves while it is in flight
    service.release.set()
    answers = await asyncio.gather(first, *rest)
    assert [a.request_id for a in answers] == [f"a{i}" for i in range(7)]
    assert service.batches == [["a0"], ["a1", "a2", "a3", "a4"], ["a5", "a6"]]
    assert coalescer.calls == 3


async def test_large_bodies_go_alone_and_a_call_too_large_is_split() -> None:
    service = _Service()
    coalescer = SubmitCoalescer(service.submit_many, max_bytes=100, max_in_flight=1)
    service.release.clear()
    first = asyncio.ensure_future(coalescer.submit(apb.SubmitRequest(deployment="w")))
    await _until(lambda: len(service.batches) == 1)
    sizes = {"s1": 10, "s2": 10, "big": 500, "s3": 10}
    rest = [
        asyncio.ensure_future(coalescer.submit(apb.SubmitRequest(deployment=d, body=b"x" * n)))
        for d, n in sizes.items()
    ]
    await _until(lambda: len(coalescer._pending) == 4)
    service.release.set()
    answers = await asyncio.gather(first, *rest, return_exceptions=True)
    assert isinstance(answers[3], ResourceExhausted)  # "big": the service's own refusal
    assert service.batches == [["w"], ["s1", "s2"], ["big"], ["s3"]]

    # A service whose message limit a whole call exceeds: each request is sent again alone.
    service.batches.clear()
    service.limit = 15
    answers = await asyncio.gather(
        *(coalescer.submit(apb.SubmitRequest(deployment=f"t{i}", body=b"x" * 10)) for i in range(3))
    )
    assert [a.request_id for a in answers] == ["t0", "t1", "t2"]
    assert service.batches[-3:] == [["t0"], ["t1"], ["t2"]]


async def test_a_refusal_is_its_own_and_an_outage_is_everyones() -> None:
    service = _Service()
    coalescer = SubmitCoalescer(service.submit_many)
    answers = await asyncio.gather(
        coalescer.submit(apb.SubmitRequest(deployment="ok")),
        coalescer.submit(apb.SubmitRequest(deployment="big")),
        return_exceptions=True,
    )
    assert isinstance(answers[0], apb.AsyncRequest) and answers[0].request_id == "ok"
    assert isinstance(answers[1], ResourceExhausted) and answers[1].message == "too large"

    service.down = True
    for outcome in await asyncio.gather(
        *(coalescer.submit(apb.SubmitRequest(deployment=f"d{i}")) for i in range(3)),
        return_exceptions=True,
    ):
        assert isinstance(outcome, Unavailable)
    # Nothing is left waiting: the next submission is served.
    service.down = False
    assert (await coalescer.submit(apb.SubmitRequest(deployment="after"))).request_id == "after"


async def test_a_caller_that_went_away_does_not_break_the_batch() -> None:
    service = _Service()
    coalescer = SubmitCoalescer(service.submit_many, max_in_flight=1)
    service.release.clear()
    sent = asyncio.ensure_future(coalescer.submit(apb.SubmitRequest(deployment="sent")))
    await _until(lambda: len(service.batches) == 1)
    gone = asyncio.ensure_future(coalescer.submit(apb.SubmitRequest(deployment="gone")))
    kept = asyncio.ensure_future(coalescer.submit(apb.SubmitRequest(deployment="kept")))
    await _until(lambda: len(coalescer._pending) == 2)
    gone.cancel()
    service.release.set()
    assert (await sent).request_id == "sent"
    assert (await kept).request_id == "kept"
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert service.batches == [["sent"], ["kept"]]  # never sent for a caller who left


async def test_waiters_hear_of_a_shutdown() -> None:
    service = _Service()
    coalescer = SubmitCoalescer(service.submit_many, max_in_flight=1)
    service.release.clear()
    waiting = [asyncio.ensure_future(coalescer.submit(apb.SubmitRequest(deployment="d0")))]
    await _until(lambda: len(service.batches) == 1)  # d0 in flight; d1, d2 wait their turn
    waiting += [
        asyncio.ensure_future(coalescer.submit(apb.SubmitRequest(deployment=f"d{i}")))
        for i in (1, 2)
    ]
    await _until(lambda: len(coalescer._pending) == 2)
    for task in list(coalescer._tasks):
        task.cancel()  # what closing the channel under a call does
    for outcome in await asyncio.gather(*waiting, return_exceptions=True):
        assert isinstance(outcome, Unavailable)
