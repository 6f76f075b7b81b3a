"""Upgrading to lots: a request accepted before them (a UUIDv4 id, its own
``async_request`` stream, a ``{"request_id": ...}`` queue message) still runs, can be
read, listed and cancelled, and keeps its per-request events."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.domain import AsyncRequest, lot
from shipyard_asyncinference.domain.events import AsyncRequestQueued
from shipyard_core.eventstore import NewEvent, RowsInsert
from shipyard_testing import wait_for

from .conftest import Stack, auth

pytestmark = pytest.mark.timeout(120)

PER_REQUEST_EVENTS = ["AsyncRequestQueued", "AsyncRequestStarted", "AsyncRequestCompleted"]


async def _legacy_request(stack: Stack, like: AsyncRequest, payload: Any) -> str:
    """Writes a request like ``like`` (its deployment, group, caller, protocol, model
    path) as the service did before lots: ``AsyncRequestQueued`` on its own
    ``async_request:<uuid4 hex>`` stream, with its inline payload row in the same
    statement; no queue message (see :func:`_legacy_message`)."""
    rid = uuid.uuid4().hex
    body = json.dumps(payload).encode()
    now = datetime.now(UTC)
    event = AsyncRequestQueued(
        deployment=like.deployment,
        group=like.group,
        caller=like.caller,
        protocol=like.protocol,
        model_path=like.model_path,
        content_type=like.content_type,
        client_request_id="",
        payload_bytes=len(body),
        payload_sha256=hashlib.sha256(body).hexdigest(),
        payload_location="inline",
        max_attempts=3,
        at=now,
        expires_at=now + timedelta(days=1),
    )
    await stack.service.service.store.append_streams(
        [
            (
                [
                    NewEvent(
                        aggregate="async_request",
                        aggregate_id=rid,
                        event_type=event.event_type(),
                        schema_version=event.schema_version,
                        payload=event.model_dump(mode="json"),
                        metadata={"actor": like.caller, "correlation_id": str(uuid.UUID(rid))},
                    )
                ],
                0,
            )
        ],
        rows=[
            RowsInsert(
                "asyncinference.blobs",
                (("request_id", "text"), ("kind", "text"), ("body", "bytea")),
                [(rid, "payload", body)],
            )
        ],
    )
    return rid


async def _legacy_message(stack: Stack, rid: str) -> None:
    """The queue message the service published for it before lots."""
    await stack.service.service.js.publish(
        f"async.requests.echo.{rid}",
        json.dumps({"request_id": rid}).encode(),
        stream="ASYNC",
        headers={"Nats-Msg-Id": str(uuid.UUID(rid))},
    )


async def _stream_types(stack: Stack, stream: str) -> list[str]:
    return [e.event_type for e in await stack.service.service.store.read_stream(stream)]


async def _listed(stack: Stack, status: str = "") -> dict[str, dict[str, Any]]:
    query = f"?status={status}" if status else ""
    async with stack.http.get(
        f"{stack.url}/deployments/echo/async{query}", headers=auth("ana-token")
    ) as r:
        assert r.status == 200, await r.text()
        return {d["request_id"]: d for d in (await r.json())["requests"]}


async def _queue_empty(stack: Stack) -> bool:
    info = await stack.service.service.js.stream_info(queue.ASYNC_STREAM)
    return bool(info.state.messages == 0)


async def test_a_request_accepted_before_lots_runs_and_can_be_read(stack: Stack) -> None:
    # A request of today, for the values the gateway gives a request of ana's to "echo".
    today = await stack.submit({"tag": "today"})
    like = await stack.service.commands.load(today)
    assert (like.deployment, like.group, like.caller) == ("echo", "team-a", "ana")
    assert len(await stack.lot_of(today)) == 24  # it is a lot's request
    await stack.wait_status(today, "completed")

    stack.worker.stop()  # nothing runs until both legacy requests are in place
    try:
        legacy = await _legacy_request(stack, like, {"tag": "legacy"})
        assert await stack.lot_of(legacy) == legacy  # no lot: its own
        assert lot(legacy).aggregate_type == "async_request"
        await _legacy_message(stack, legacy)
        assert await queue.is_queued(stack.service.service.js, legacy, "echo")
        waiting = await stack.status(legacy)
        assert waiting["status"] == "queued", waiting
        assert waiting["caller"] == "ana" and waiting["protocol"] == like.protocol
    finally:
        stack.worker.start()

    done = await stack.wait_status(legacy, "completed", "failed", within=60)
    assert done["status"] == "completed", done
    assert done["attempts"] == 1
    assert done["result_url"] == f"/deployments/echo/async/{legacy}/result"
    async with stack.http.get(stack.url + done["result_url"], headers=auth("ana-token")) as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"echo": {"tag": "legacy"}, "user": "ana"}
    assert stack.model.calls().count("legacy") == 1

    # Its changes stay on its own stream, as the per-request events; no lot stream.
    assert await stack.event_types(legacy) == PER_REQUEST_EVENTS
    assert await _stream_types(stack, f"async_request:{legacy}") == PER_REQUEST_EVENTS
    assert await _stream_types(stack, f"async_lot:{legacy}") == []
    assert await _stream_types(stack, f"async_lot:{legacy[:24]}") == []

    # The list (the projection) has it, completed, next to today's request.
    async def listed() -> bool:
        rows = await _listed(stack, "completed")
        return legacy in rows and today in rows

    await wait_for(listed, timeout=10, message="the legacy request to be listed completed")
    row = (await _listed(stack))[legacy]
    assert row["status"] == "completed" and row["attempts"] == 1
    assert row["caller"] == "ana" and row["deployment"] == "echo"


async def test_a_request_accepted_before_lots_can_be_cancelled(stack: Stack) -> None:
    like = await stack.service.commands.load(await stack.submit({"tag": "today-2"}))
    stack.worker.stop()  # its (late) queue message must not be taken before the cancel
    try:
        legacy = await _legacy_request(stack, like, {"tag": "legacy-cancelled"})
        assert (await stack.status(legacy))["status"] == "queued"
        url = f"{stack.url}/deployments/echo/async/{legacy}"
        async with stack.http.delete(url, headers=auth("bob-token")) as r:
            assert r.status == 404  # not bob's
        async with stack.http.delete(url, headers=auth("ana-token")) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["status"] == "cancelled"
        async with stack.http.post(url + "/cancel", headers=auth("ana-token")) as r:
            assert r.status == 409  # cancelled already
        types = await _stream_types(stack, f"async_request:{legacy}")
        assert types == ["AsyncRequestQueued", "AsyncRequestCancelled"]
        assert await stack.event_types(legacy) == types
        assert await _stream_types(stack, f"async_lot:{legacy}") == []
        # An old queue message for it still comes in later: the worker must not run it.
        await _legacy_message(stack, legacy)
    finally:
        stack.worker.start()

    await wait_for(lambda: _queue_empty(stack), timeout=60, message="the work queue to drain")
    assert "legacy-cancelled" not in stack.model.calls()
    document = await stack.status(legacy)
    assert document["status"] == "cancelled", document
    assert "result_url" not in document
    types = await _stream_types(stack, f"async_request:{legacy}")
    assert types[-1] == "AsyncRequestCancelled", types
    assert types == ["AsyncRequestQueued", "AsyncRequestCancelled"]

    async def listed() -> bool:
        return legacy in await _listed(stack, "cancelled")

    await wait_for(listed, timeout=10, message="the legacy request to be listed cancelled")
