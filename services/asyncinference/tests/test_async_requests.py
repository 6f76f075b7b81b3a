"""Async requests end to end: gateway (X-Async-Request) → asyncinference (PostgreSQL,
JetStream work queue) → worker process → gateway → a real model server, and back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from shipyard.asyncinference.v1 import asyncinference_pb2 as apb
from shipyard.asyncinference.v1 import asyncinference_pb2_grpc
from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.adapters.gateway import GatewayRunner, Outcome
from shipyard_asyncinference.app import RequestView, Submission, Worker
from shipyard_asyncinference.app.worker import Runner
from shipyard_asyncinference.domain import AsyncRequest
from shipyard_core.auth import Principal
from shipyard_runtime import batchwire
from shipyard_testing import wait_for

from .conftest import INTERNAL, MAX_PAYLOAD, Stack, auth, md, open_gate

pytestmark = pytest.mark.timeout(120)


async def test_submit_runs_to_completion_with_the_models_answer(stack: Stack) -> None:
    request_id = await stack.submit({"tag": "hello", "x": [1, 2, 3]})
    done = await stack.wait_status(request_id, "completed", "failed")
    assert done["status"] == "completed", done
    assert done["attempts"] == 1
    assert done["result_url"] == f"/deployments/echo/async/{request_id}/result"
    async with stack.http.get(stack.url + done["result_url"], headers=auth("ana-token")) as r:
        assert r.status == 200
        assert r.headers["Content-Disposition"].startswith("attachment")
        result = await r.json()
    # The model got the payload as sent, and the original caller in X-Forwarded-User.
    assert result == {"echo": {"tag": "hello", "x": [1, 2, 3]}, "user": "ana"}
    assert await stack.event_types(request_id) == [
        "AsyncRequestQueued",
        "AsyncRequestStarted",
        "AsyncRequestCompleted",
    ]

    # The list (the projection) has it, filtered by status.
    async def listed() -> list[str]:
        async with stack.http.get(
            f"{stack.url}/deployments/echo/async?status=completed", headers=auth("ana-token")
        ) as r:
            assert r.status == 200
            return [d["request_id"] for d in (await r.json())["requests"]]

    await wait_for(lambda: _contains(listed, request_id), timeout=10, message="listed")
    async with stack.http.get(
        f"{stack.url}/deployments/echo/async?status=queued&since=2000-01-01T00:00Z",
        headers=auth("ana-token"),
    ) as r:
        assert request_id not in [d["request_id"] for d in (await r.json())["requests"]]


async def _contains(listed: object, request_id: str) -> bool:
    assert callable(listed)
    return request_id in await listed()


async def test_every_prediction_protocol_can_be_async(stack: Stack) -> None:
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    async with stack.http.post(
        f"{stack.url}/v2/models/echo/infer",
        json=body,
        headers={**auth("ana-token"), "X-Async-Request": "true"},
    ) as r:
        assert r.status == 202, await r.text()
        request_id = (await r.json())["request_id"]
    done = await stack.wait_status(request_id, "completed", "failed")
    assert done["status"] == "completed", done
    assert done["protocol"] == "v2"
    # A malformed envelope is refused at once, like a synchronous request.
    async with stack.http.post(
        f"{stack.url}/v1/models/echo:predict",
        json={"no-instances": 1},
        headers={**auth("ana-token"), "X-Async-Request": "true"},
    ) as r:
        assert r.status == 400


async def test_refusals_at_submit(stack: Stack) -> None:
    url = f"{stack.url}/deployments/echo/predict"
    headers = {"X-Async-Request": "true"}
    async with stack.http.post(url, json={}, headers=headers) as r:
        assert r.status == 401
        assert "WWW-Authenticate" in r.headers
    async with stack.http.post(url, json={}, headers={**headers, **auth("bob-token")}) as r:
        assert r.status == 403
    async with stack.http.post(
        f"{stack.url}/deployments/nope/predict", json={}, headers={**headers, **auth("ana-token")}
    ) as r:
        assert r.status == 404
    async with stack.http.post(
        f"{stack.url}/deployments/stopped/predict",
        json={},
        headers={**headers, **auth("ana-token")},
    ) as r:
        assert r.status == 503
    big = json.dumps({"pad": "x" * (MAX_PAYLOAD + 10)}).encode()
    async with stack.http.post(
        url, data=big, headers={**headers, **auth("ana-token"), "Content-Type": "application/json"}
    ) as r:
        assert r.status == 413
        assert f"at most {MAX_PAYLOAD} bytes" in (await r.json())["error"]


async def test_kill_9_of_the_worker_mid_request_completes_once(stack: Stack, gate: Path) -> None:
    request_id = await stack.submit({"tag": "killed", "wait_for": str(gate)})
    await stack.wait_status(request_id, "running")
    await wait_for(lambda: "killed" in stack.model.calls(), timeout=10, message="model called")
    stack.worker.kill9()
    stack.worker.start()
    # Redelivered after the ack wait to the new worker, which starts attempt 2. (Its
    # model call may queue behind the orphaned first one, held on the gate.)

    async def second_attempt() -> bool:
        return (await stack.event_types(request_id)).count("AsyncRequestStarted") == 2

    await wait_for(second_attempt, timeout=30, interval=0.05, message="second attempt")
    open_gate(gate)
    done = await stack.wait_status(request_id, "completed", "failed")
    assert done["status"] == "completed", done
    assert done["attempts"] == 2
    types = await stack.event_types(request_id)
    assert types.count("AsyncRequestCompleted") == 1, types
    assert types == [
        "AsyncRequestQueued",
        "AsyncRequestStarted",
        "AsyncRequestStarted",
        "AsyncRequestCompleted",
    ]
    # The model ran it twice (the killed worker's call went on); one result was stored.
    await wait_for(lambda: stack.model.calls().count("killed") == 2, timeout=10)


async def test_poison_request_fails_after_the_bounded_attempts(stack: Stack) -> None:
    request_id = await stack.submit({"tag": "poison", "fail": True})
    done = await stack.wait_status(request_id, "failed", "completed")
    assert done["status"] == "failed"
    assert done["attempts"] == 3
    assert "gave up after 3 attempts" in done["error"]
    assert "the model answered 500" in done["error"]
    assert stack.model.calls().count("poison") == 3
    async with stack.http.get(
        f"{stack.url}/deployments/echo/async/{request_id}/result", headers=auth("ana-token")
    ) as r:
        assert r.status == 409
        assert "is failed" in (await r.json())["error"]


async def test_cancel_a_queued_request(stack: Stack, gate: Path) -> None:
    # The worker process runs one request at a time: hold it, then queue another.
    holder = await stack.submit({"tag": "holder", "wait_for": str(gate)})
    await stack.wait_status(holder, "running")
    queued = await stack.submit({"tag": "cancelled"})
    assert (await stack.status(queued))["status"] == "queued"
    url = f"{stack.url}/deployments/echo/async/{queued}"
    async with stack.http.delete(url, headers=auth("bob-token")) as r:
        assert r.status == 404  # not bob's to cancel (nor to know of)
    async with stack.http.delete(url, headers=auth("ana-token")) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["status"] == "cancelled"
    async with stack.http.post(url + "/cancel", headers=auth("ana-token")) as r:
        assert r.status == 409  # cancelled already
    async with stack.http.post(
        f"{stack.url}/deployments/echo/async/{holder}/cancel", headers=auth("ana-token")
    ) as r:
        assert r.status == 409  # running: too late
    open_gate(gate)
    await stack.wait_status(holder, "completed")
    # The worker saw the cancelled one's message after the holder, and did not run it.
    await wait_for(lambda: _queue_empty(stack), timeout=10, message="the work queue to drain")
    assert "cancelled" not in stack.model.calls()
    assert (await stack.status(queued))["status"] == "cancelled"


async def _queue_empty(stack: Stack) -> bool:
    info = await stack.service.service.js.stream_info("ASYNC")
    return info.state.messages == 0


async def test_expiry_removes_payload_and_result(stack: Stack) -> None:
    commands = stack.service.commands
    kept = commands.retention
    commands.retention = timedelta(seconds=1)
    try:
        # Larger than inline_max_bytes: payload and result go to the object store.
        request_id = await stack.submit({"tag": "expiring", "pad": "y" * 4000})
    finally:
        commands.retention = kept
    done = await stack.wait_status(request_id, "completed", "failed")
    assert done["status"] == "completed", done
    objects = sorted(p.name for p in (stack.objects_dir / "async" / request_id).iterdir())
    assert objects == ["payload", "result-1"]

    async def swept() -> bool:
        await stack.service.sweeper.sweep_once()
        return bool((await stack.status(request_id))["expired"])

    await wait_for(swept, timeout=15, interval=0.2, message="the request to expire")
    folder = stack.objects_dir / "async" / request_id
    assert not folder.exists() or not list(folder.iterdir())
    document = await stack.status(request_id)
    assert document["status"] == "completed" and document["expired"] is True
    assert "result_url" not in document
    async with stack.http.get(
        f"{stack.url}/deployments/echo/async/{request_id}/result", headers=auth("ana-token")
    ) as r:
        assert r.status == 410
    assert (await stack.event_types(request_id))[-1] == "AsyncRequestExpired"
    # A small one is removed from PostgreSQL alike.
    pool = stack.service.service.pool
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM asyncinference.blobs WHERE request_id = $1", request_id
        )
        == 0
    )


async def test_team_b_sees_nothing_of_team_a(stack: Stack) -> None:
    request_id = await stack.submit({"tag": "private"})
    await stack.wait_status(request_id, "completed", "failed")
    base = f"{stack.url}/deployments/echo/async"
    for path in (f"/{request_id}", f"/{request_id}/result", ""):
        async with stack.http.get(base + path, headers=auth("bob-token")) as r:
            assert r.status == 404, path
            assert "team-a" not in await r.text()
    async with stack.http.get(base + f"/{request_id}") as r:
        assert r.status == 401
    # Directly on the service's gRPC API: NOT_FOUND and an empty list for bob.
    async with stack.channel() as channel:
        stub = asyncinference_pb2_grpc.AsyncInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetRequest(
                apb.GetRequestRequest(deployment="echo", request_id=request_id),
                metadata=md("bob-token"),
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.ListRequests(
            apb.ListRequestsRequest(deployment="echo"), metadata=md("bob-token")
        )
        assert list(listed.requests) == []
        mine = await stub.GetRequest(
            apb.GetRequestRequest(deployment="echo", request_id=request_id),
            metadata=md("ana-token"),
        )
        assert mine.status == apb.ASYNC_STATUS_COMPLETED
        # Submit is for the gateway only.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Submit(
                apb.SubmitRequest(deployment="echo", group="team-a", model_path="/predict"),
                metadata=md("ana-token"),
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nobody but the service's workers may use the run route.
    async with stack.http.post(
        f"{base}/{request_id}/run", json={}, headers=auth("root-token")
    ) as r:
        assert r.status == 403


async def test_a_request_to_a_deployment_scaled_to_zero_wakes_it(stack: Stack) -> None:
    request_id = await stack.submit({"tag": "wake"}, deployment="sleepy")
    done = await stack.wait_status(request_id, "completed", "failed", deployment="sleepy")
    assert done["status"] == "completed", done
    assert stack.scheduler.activations == ["sleepy"]


async def test_a_request_whose_queue_message_was_lost_is_sent_again(stack: Stack) -> None:
    """The ASYNC stream loses a message (deleted here; a restore from an older backup or a
    broker crash alike): the sweeper finds the request waiting with no message and puts
    it back on the queue, even behind older requests whose messages are fine; it then
    runs once."""
    js = stack.service.service.js
    sweeper = stack.service.sweeper
    stack.worker.stop()  # nobody takes them meanwhile
    try:
        older = await stack.submit({"tag": "kept"})
        lost = await stack.submit({"tag": "lost"})
        for request_id in (older, lost):
            await stack.wait_queued(request_id)
        kept = sweeper.redispatch_after
        sweeper.redispatch_after = timedelta(0)
        try:
            # Their messages are there: nothing to do.
            assert await sweeper.redispatch_once() == 0
            lost_lot = await stack.lot_of(lost)
            gone = await js.get_last_msg(queue.ASYNC_STREAM, queue.subject("echo", lost_lot))
            await js.delete_msg(queue.ASYNC_STREAM, gone.seq)
            assert not await queue.is_queued(js, lost_lot, "echo")
            # One candidate per call: the older one (fine) first, then the lost one.
            assert await sweeper.redispatch_once(page=1) == 0
            assert await sweeper.redispatch_once(page=1) == 1
            assert await queue.is_queued(js, lost_lot, "echo")
            assert await sweeper.redispatch_once() == 0  # sent once, not every sweep
        finally:
            sweeper.redispatch_after = kept
        assert (await stack.status(lost))["status"] == "queued"
    finally:
        stack.worker.start()
    for request_id in (older, lost):
        done = await stack.wait_status(request_id, "completed", "failed")
        assert done["status"] == "completed", done
    assert await stack.event_types(lost) == [
        "AsyncRequestQueued",
        "AsyncRequestStarted",
        "AsyncRequestCompleted",
    ]


async def test_a_burst_is_stored_started_and_completed_in_batches(stack: Stack) -> None:
    """Concurrent submissions share a transaction (the gateway's SubmitMany) and a worker
    takes what waits in batches: one transaction starts them, one stores their results.
    Each request still gets its own answer: an oversized one in the burst is refused
    alone, a failing one is retried alone, a large payload and result go through the
    object store, and a request whose queue message arrives twice runs once."""
    js = stack.service.service.js
    pool = stack.service.service.store.pool
    async with _batching_worker(stack) as start_worker:
        big = json.dumps({"pad": "x" * (MAX_PAYLOAD + 10)})
        submissions: list[Any] = [{"tag": f"burst-{i}"} for i in range(16)]
        submissions += [
            {"tag": "burst-large", "pad": "y" * 4096},
            {"tag": "burst-poison", "fail": True},
        ]
        calls_before = stack.api.submissions.calls

        async def post(payload: Any) -> tuple[int, dict[str, Any]]:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            async with stack.http.post(
                f"{stack.url}/deployments/echo/predict",
                data=data,
                headers={
                    **auth("ana-token"),
                    "X-Async-Request": "true",
                    "Content-Type": "application/json",
                },
            ) as r:
                return r.status, await r.json()

        answers = await asyncio.gather(*(post(p) for p in [*submissions, big]))
        *accepted, refused = answers
        assert refused[0] == 413 and f"at most {MAX_PAYLOAD} bytes" in refused[1]["error"]
        assert all(status == 202 for status, _ in accepted), accepted
        ids = {
            p["tag"]: body["request_id"] for p, (_, body) in zip(submissions, accepted, strict=True)
        }
        assert stack.api.submissions.calls - calls_before < len(answers)  # they went together
        for request_id in ids.values():
            await stack.wait_queued(request_id)
        # A second message for one lot (a relay's copy outside the duplicate window).
        twice = ids["burst-3"]
        await queue.enqueue(js, await stack.lot_of(twice), "echo", str(uuid.uuid4()))

        exchanges = stack.model.exchanges(batchwire.PATH), stack.model.exchanges("/predict")
        predictions = len(stack.model.calls())
        start_worker()
        for tag, request_id in ids.items():
            done = await stack.wait_status(request_id, "completed", "failed", within=60)
            if tag == "burst-poison":
                assert done["status"] == "failed" and done["attempts"] == 3, done
                continue
            assert done["status"] == "completed", (tag, done)
            # (The request queued twice runs once when both messages come in one batch,
            # the usual case; if not, the second message starts a second attempt.)
            assert done["attempts"] == 1 or request_id == twice, (tag, done)
            async with stack.http.get(
                f"{stack.url}{done['result_url']}", headers=auth("ana-token")
            ) as r:
                assert (await r.json())["echo"]["tag"] == tag
        types = await stack.event_types(twice)
        assert types.count("AsyncRequestCompleted") == 1, types
        assert stack.model.calls().count("burst-3") == types.count("AsyncRequestStarted")
        # The model server was called in batches (its batch route; a lone request, such
        # as the poison one's retries, through its own route): fewer exchanges than
        # predictions.
        # (Access-log lines are written after the answer, hence the wait.)
        batches = await wait_for(lambda: stack.model.exchanges(batchwire.PATH) - exchanges[0])
        alone = stack.model.exchanges("/predict") - exchanges[1]
        assert batches > 0 and batches + alone < len(stack.model.calls()) - predictions
        # Lots: fewer events and transactions than requests for each step.
        rows = await pool.fetch(
            "SELECT event_type, count(DISTINCT tx_id) AS txs, count(*) AS n "
            "FROM asyncinference.events WHERE stream_id = ANY($1::text[]) GROUP BY event_type",
            list({f"async_lot:{await stack.lot_of(r)}" for r in ids.values()}),
        )
        by_type = {row["event_type"]: (row["txs"], row["n"]) for row in rows}
        for kind in ("AsyncLotQueued", "AsyncLotStarted", "AsyncLotCompleted"):
            txs, n = by_type[kind]
            assert txs <= n < len(ids), (kind, by_type)


async def test_a_slow_request_does_not_hold_back_the_others_of_its_batch(stack: Stack) -> None:
    release = asyncio.Event()
    async with _batching_worker(stack, hold=release) as start_worker:
        slow = await stack.submit({"tag": "held"})
        fast = await stack.submit({"tag": "quick"})
        for request_id in (slow, fast):
            await stack.wait_queued(request_id)
        start_worker()  # both come in one fetch; the worker holds "held" before its call
        done = await stack.wait_status(fast, "completed", "failed")
        assert done["status"] == "completed", done
        assert (await stack.status(slow))["status"] == "running"
        release.set()
        assert (await stack.wait_status(slow, "completed", "failed"))["status"] == "completed"
        started = await stack.service.service.store.pool.fetchval(
            "SELECT count(DISTINCT tx_id) FROM asyncinference.events "
            "WHERE event_type = 'AsyncLotStarted' AND stream_id = ANY($1::text[])",
            [f"async_lot:{await stack.lot_of(slow)}", f"async_lot:{await stack.lot_of(fast)}"],
        )
        assert started == 1  # they were one batch


async def test_a_call_that_fails_as_a_whole_is_retried_one_request_at_a_time(
    stack: Stack,
) -> None:
    """A lot's requests share one model call; when that call fails as a whole (here: the
    gateway's timeout, which one hanging request causes), each is tried again alone in
    the same attempt, so the hanging one fails none of its neighbours."""
    runner = GatewayRunner(stack.url, INTERNAL, 30.0)
    together = _HangingTogether(runner)
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.push_async_callback(runner.close)
        start_worker = await cleanup.enter_async_context(_batching_worker(stack, runner=together))
        internal = Principal(user="gateway", admin=False, internal=True)
        subs = [
            Submission("echo", "team-a", "ana", "/predict", "application/json", body, "raw")
            for body in (
                b'{"tag": "hang"}',
                b'{"tag": "n-1"}',
                b'{"tag": "n-2"}',
                b'{"tag": "n-3"}',
            )
        ]
        views = await stack.service.commands.submit_many(internal, subs)
        ids = [v.request_id for v in views if isinstance(v, RequestView)]
        assert len(ids) == 4 and len({await stack.lot_of(r) for r in ids}) == 1  # one lot
        start_worker()
        for request_id in ids[1:]:
            done = await stack.wait_status(request_id, "completed", "failed")
            assert done["status"] == "completed" and done["attempts"] == 1, done
        hung = await stack.wait_status(ids[0], "failed", within=60)
        assert hung["attempts"] == 3 and "no answer from the gateway" in hung["error"], hung
    assert together.whole_failures >= 1  # the lot was first called together


class _HangingTogether:
    """The real gateway runner, except that a call with the payload tagged "hang" gets no
    answer in time: a call of several fails as a whole, as a gateway timeout does, and
    the "hang" request alone fails too."""

    def __init__(self, runner: GatewayRunner) -> None:
        self.runner = runner
        self.whole_failures = 0

    async def run_batch(self, runs: Sequence[tuple[AsyncRequest, bytes]]) -> list[Outcome]:
        if not any(json.loads(body).get("tag") == "hang" for _, body in runs):
            return await self.runner.run_batch(runs)
        late = Outcome(504, "", b"", error="no answer from the gateway in time")
        if len(runs) == 1:
            return [late]
        self.whole_failures += 1
        return [dataclasses.replace(late, whole=True)] * len(runs)


class _HoldingRunner:
    """The real gateway runner, except that a call with a payload tagged "held" waits for
    ``release`` first (held in the worker, so the model server's own queue plays no
    part)."""

    def __init__(self, runner: GatewayRunner, release: asyncio.Event) -> None:
        self.runner = runner
        self.release = release

    async def run_batch(self, runs: Sequence[tuple[AsyncRequest, bytes]]) -> list[Outcome]:
        if any(json.loads(body).get("tag") == "held" for _, body in runs):
            await self.release.wait()
        return await self.runner.run_batch(runs)


@contextlib.asynccontextmanager
async def _batching_worker(
    stack: Stack, hold: asyncio.Event | None = None, runner: Runner | None = None
) -> AsyncIterator[Callable[[], None]]:
    """Stops the worker process (what is submitted meanwhile waits) and yields a function
    that starts a worker in this process taking up to 32 requests at a time (``hold``:
    see :class:`_HoldingRunner`); the worker process runs again afterwards."""
    stack.worker.stop()
    stop = asyncio.Event()
    gateway = GatewayRunner(stack.url, INTERNAL, 30.0)
    worker = Worker(
        stack.service.commands,
        stack.service.service.js,
        runner or (gateway if hold is None else _HoldingRunner(gateway, hold)),
        concurrency=32,
        ack_wait_seconds=5.0,
        retry_delay_seconds=0.1,
        name="batching-worker",
    )
    tasks: list[asyncio.Task[None]] = []
    try:
        yield lambda: tasks.append(asyncio.ensure_future(worker.run(stop)))
    finally:
        if hold is not None:
            hold.set()
        stop.set()
        for task in tasks:
            await asyncio.wait_for(task, 30)
        await gateway.close()
        stack.worker.start()
