"""The gateway's ``POST /deployments/{d}/async/runs`` (a worker's lot in one call) and its
client, against the real gateway and model server; and both ways of an upgrade: a model
server and a gateway from before the batch route."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from shipyard.scheduler.v1 import scheduler_pb2 as spb
from shipyard_asyncinference.adapters.gateway import ANSWERED_BY, GatewayRunner
from shipyard_asyncinference.domain import AsyncRequest
from shipyard_runtime import batchwire
from shipyard_testing import wait_for
from shipyard_testing.web import serve_app

from .conftest import INTERNAL, Stack, auth


def _part(
    body: dict[str, Any], *, caller: str = "ana", group: str = "team-a", path: str = "/predict"
) -> batchwire.Part:
    head = {
        "model_path": path,
        "caller": caller,
        "group": group,
        "content_type": "application/json",
        "request_id": f"req-{body.get('tag')}",
    }
    return batchwire.Part(head, json.dumps(body).encode())


async def _runs(
    stack: Stack, deployment: str, parts: list[batchwire.Part], token: str = INTERNAL
) -> tuple[int, dict[str, str], bytes]:
    async with stack.http.post(
        f"{stack.url}/deployments/{deployment}/async/runs",
        data=batchwire.encode(parts),
        headers={**auth(token), "Content-Type": batchwire.CONTENT_TYPE},
    ) as r:
        return r.status, dict(r.headers), await r.read()


async def test_the_runs_route_answers_each_request_as_the_run_route_would(stack: Stack) -> None:
    before = stack.model.exchanges(batchwire.PATH)
    status, headers, body = await _runs(
        stack,
        "echo",
        [
            _part({"tag": "one"}),
            _part({"tag": "nowhere"}, path="/etc/passwd"),
            _part({"tag": "outsider"}, caller="bob", group="team-b"),
            _part({"tag": "two"}),
            batchwire.Part(
                {**_part({}).head, "content_type": "application/json\r\nX-Forwarded-User: root"},
                b"{}",
            ),
        ],
    )
    assert status == 200 and headers["Content-Type"] == batchwire.CONTENT_TYPE
    answers = batchwire.decode(body)
    heads = [(a.head["status"], a.head["answered_by"]) for a in answers]
    assert heads == [
        (200, "model"),
        (400, "gateway"),
        (403, "gateway"),
        (200, "model"),
        (400, "gateway"),
    ], answers
    assert "content-type" in json.loads(answers[4].body)["error"]
    assert json.loads(answers[0].body) == {"echo": {"tag": "one"}, "user": "ana"}
    assert json.loads(answers[3].body)["echo"] == {"tag": "two"}
    assert "model_path" in json.loads(answers[1].body)["error"]
    # The two allowed ones reached the model server in one exchange. (The server writes
    # its access-log line after it has answered, so the count is awaited.)
    seen = await wait_for(lambda: stack.model.exchanges(batchwire.PATH) - before)
    assert seen == 1
    # A client's odd X-Request-Id (accepted when it submitted) is replaced, not refused.
    status, _, body = await _runs(
        stack,
        "echo",
        [
            batchwire.Part({**_part({}).head, "request_id": "café\tid"}, b'{"tag": "odd"}'),
            _part({"tag": "plain"}),
        ],
    )
    assert [a.head["status"] for a in batchwire.decode(body)] == [200, 200]

    # Refusals of the whole are answered as a whole, by the gateway.
    for token, want in (("", 401), ("ana-token", 403)):
        status, headers, _ = await _runs(stack, "echo", [_part({"tag": "x"})], token=token)
        assert (status, headers[ANSWERED_BY]) == (want, "gateway")
    status, headers, _ = await _runs(stack, "missing", [_part({"tag": "x"})])
    assert (status, headers[ANSWERED_BY]) == (404, "gateway")
    async with stack.http.post(
        f"{stack.url}/deployments/echo/async/runs",
        data=b'{"parts": [{"length": 5}]}\n',
        headers=auth(INTERNAL),
    ) as r:
        assert r.status == 400 and "5 bytes announced" in (await r.json())["error"]


@pytest.fixture
async def old_model_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A stand-in for a model server from before the batch route: ``/predict`` echoes,
    any other path is 404 (as the runtime answers an unknown path). Yields its address
    and the paths it was asked for."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        if request.path != "/predict":
            return web.json_response({"error": "no such endpoint"}, status=404)
        return web.json_response({"echo": await request.json(), "old": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with serve_app(app) as port:
        yield f"127.0.0.1:{port}", seen


async def test_a_model_server_without_the_batch_route_gets_them_one_by_one(
    stack: Stack, old_model_server: tuple[str, list[str]]
) -> None:
    address, seen = old_model_server
    stack.scheduler.push(
        spb.RouteUpdate(
            deployment="old-image",
            group="team-a",
            access=spb.ACCESS_PRIVATE,
            revision=1,
            addresses=[address],
        )
    )
    await wait_for(
        lambda: stack.gateway.routes.get("old-image") is not None,  # type: ignore[union-attr]
        timeout=10,
        message="the gateway to learn the route",
    )
    status, _, body = await _runs(stack, "old-image", [_part({"tag": "a"}), _part({"tag": "b"})])
    assert status == 200
    answers = batchwire.decode(body)
    assert [(a.head["status"], a.head["answered_by"]) for a in answers] == [(200, "model")] * 2
    assert [json.loads(a.body) for a in answers] == [
        {"echo": {"tag": "a"}, "old": True},
        {"echo": {"tag": "b"}, "old": True},
    ]
    assert seen == [batchwire.PATH, "/predict", "/predict"]


async def test_the_runner_goes_one_by_one_against_a_gateway_without_the_runs_route() -> None:
    """A rolling upgrade: the worker is new, the gateway old (aiohttp's own 404 for the
    unknown route, without ``X-Shipyard-Answered-By``). The requests run through the old
    run route, and the runs route is not tried again for a while."""
    seen: list[str] = []

    async def run_one(request: web.Request) -> web.Response:
        seen.append(request.match_info["ref"])
        return web.json_response({"ran": await request.json()}, headers={ANSWERED_BY: "model"})

    app = web.Application()
    app.router.add_post("/deployments/{d}/async/{ref}/run", run_one)
    async with serve_app(app) as port:
        client = GatewayRunner(f"http://127.0.0.1:{port}", INTERNAL, 10.0)
        try:
            requests = []
            for tag in ("a", "b"):
                agg = AsyncRequest(f"{tag * 32}")
                agg.deployment, agg.model_path = "d", "/predict"
                agg.content_type = "application/json"
                requests.append((agg, json.dumps({"tag": tag}).encode()))
            outcomes = await client.run_batch(requests)
            assert [json.loads(o.body) for o in outcomes if o.ok] == [
                {"ran": {"tag": "a"}},
                {"ran": {"tag": "b"}},
            ]
            assert sorted(seen) == ["a" * 32, "b" * 32]
            again = await client.run_batch(requests[:1])
            assert again[0].ok and len(seen) == 3
        finally:
            await client.close()
