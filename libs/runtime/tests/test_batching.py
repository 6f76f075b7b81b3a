"""Adaptive batching, against a real server: requests that arrive together are answered by
one ``predict_batch()`` call, each still gets its own answer (and its own error), and a
failing ``predict_batch()`` falls back to ``predict()`` per request."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard_runtime import batchwire
from shipyard_testing import wait_for_sync

from .conftest import RuntimeServer, write_model

# predict() and predict_batch() say which one answered and how big the batch was. A
# payload {"hold": s, "flag": path} creates ``path`` then blocks the worker's loop for s
# seconds: requests sent once the file exists are all waiting when it looks again, a batch.
SCRIPT = """
import time

def load(model_dir):
    return None

def _one(payload, size):
    if isinstance(payload, list):  # KServe v1: the instances
        return [_one(p, size) for p in payload]
    if not isinstance(payload, dict):
        raise ValueError("expected an object")
    if "hold" in payload:
        open(payload["flag"], "w").close()  # the test sends the others once it exists
        time.sleep(payload["hold"])
    return {"x": payload.get("x"), "batch": size}

def predict(model, payload):
    return _one(payload, 1)

def predict_batch(model, payloads):
    if any(isinstance(p, dict) and p.get("batch_breaks") for p in payloads):
        return ["too few"]
    return [_one(p, len(payloads)) for p in payloads]
"""


@pytest.fixture(scope="module")
def batching(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeServer]:
    folder = write_model(tmp_path_factory.mktemp("models") / "batcher", SCRIPT)
    server = RuntimeServer(folder, tmp_path_factory.mktemp("logs") / "batcher.log")
    yield server
    assert server.stop() == 0, server.logs()


def _request(path: str, payload: Any) -> bytes:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _read_answer(sock: socket.socket) -> tuple[int, Any]:
    """One answer; reads byte by byte past the head so pipelined answers stay unread."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, "connection closed"
        head += byte
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return int(head.split(b" ", 2)[1]), json.loads(body)


def _together(server: RuntimeServer, payloads: list[tuple[str, Any]]) -> list[tuple[int, Any]]:
    """Holds the worker for 0.5 s, sends every payload on its own connection meanwhile,
    and returns their answers in order."""
    holder = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    others = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in payloads]
    try:
        # Connections in use already (as the gateway's kept-alive ones are): a connection
        # still in the accept queue would be taken one per loop turn.
        for sock in (holder, *others):
            sock.sendall(_request("/predict", {"x": "warm"}))
            assert _read_answer(sock)[0] == 200
        flag = server.log_path.with_name(f"hold-{uuid.uuid4().hex}")
        holder.sendall(_request("/predict", {"hold": 0.5, "flag": str(flag)}))
        wait_for_sync(flag.exists, message="the worker holding")
        for sock, (path, payload) in zip(others, payloads, strict=True):
            sock.sendall(_request(path, payload))
        assert _read_answer(holder)[0] == 200
        return [_read_answer(sock) for sock in others]
    finally:
        for sock in (holder, *others):
            sock.close()


def test_requests_that_arrive_together_share_one_predict_batch_call(
    batching: RuntimeServer,
) -> None:
    # Alone: predict_batch with one payload is not worth it; predict() answers.
    status, _, body = batching.request("POST", "/predict", {"x": 0})
    assert (status, body) == (200, {"x": 0, "batch": 1})

    answers = _together(batching, [("/predict", {"x": n}) for n in range(8)])
    assert answers == [(200, {"x": n, "batch": 8}) for n in range(8)], answers

    # Every protocol's shape batches with the others and keeps its own answer shape.
    mixed = _together(
        batching,
        [
            ("/predict", {"x": "raw"}),
            ("/v1/models/batcher:predict", {"instances": [{"x": "v1"}]}),
            ("/api/v1.0/predictions", {"jsonData": {"x": "seldon"}}),
        ],
    )
    assert mixed[0] == (200, {"x": "raw", "batch": 3}), mixed
    assert mixed[1] == (200, {"predictions": [{"x": "v1", "batch": 3}]})
    assert mixed[2] == (200, {"jsonData": {"x": "seldon", "batch": 3}, "meta": {}})


def test_a_failing_batch_is_answered_request_by_request(batching: RuntimeServer) -> None:
    # One bad payload makes predict_batch raise: the others still get their answers
    # (from predict()), and the bad one its own 400.
    answers = _together(
        batching, [("/predict", {"x": 1}), ("/predict", "not an object"), ("/predict", {"x": 3})]
    )
    assert answers[0] == (200, {"x": 1, "batch": 1})
    assert answers[1] == (400, {"error": "predict() raised ValueError: expected an object"})
    assert answers[2] == (200, {"x": 3, "batch": 1})

    # predict_batch breaking its contract (too few results) is caught the same way.
    broken = _together(
        batching, [("/predict", {"x": 1, "batch_breaks": True}), ("/predict", {"x": 2})]
    )
    assert broken == [(200, {"x": 1, "batch": 1}), (200, {"x": 2, "batch": 1})]
    assert "predict_batch() failed" in batching.logs()


def test_malformed_requests_are_refused_before_they_join_a_batch(
    batching: RuntimeServer,
) -> None:
    answers = _together(batching, [("/predict", {"x": 1}), ("/predict", b"not json{")])
    assert answers[0] == (200, {"x": 1, "batch": 1})
    assert answers[1][0] == 400 and "JSON" in answers[1][1]["error"]


def test_pipelined_requests_on_one_connection_are_answered_in_order(
    batching: RuntimeServer, tmp_path: Path
) -> None:
    with socket.create_connection(("127.0.0.1", batching.port), timeout=30) as sock:
        sock.sendall(b"".join(_request("/predict", {"x": n}) for n in range(5)))
        assert [_read_answer(sock) for _ in range(5)] == [
            (200, {"x": n, "batch": 1}) for n in range(5)
        ]


def test_max_batch_1_turns_batching_off(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "batcher", SCRIPT)
    server = RuntimeServer(folder, tmp_path / "off.log", "--max-batch", "1")
    try:
        assert _together(server, [("/predict", {"x": n}) for n in range(3)]) == [
            (200, {"x": n, "batch": 1}) for n in range(3)
        ]
    finally:
        assert server.stop() == 0, server.logs()


def _batch_call(server: RuntimeServer, parts: list[batchwire.Part]) -> tuple[int, str, bytes]:
    body = batchwire.encode(parts)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            (
                f"POST {batchwire.PATH} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: {batchwire.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = sock.recv(1)
            assert byte, "connection closed"
            head += byte
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
        length = int(fields[b"Content-Length"])
        answer = b""
        while len(answer) < length:
            answer += sock.recv(length - len(answer))
    return int(head.split(b" ", 2)[1]), fields[b"Content-Type"].decode(), answer


def test_the_batch_route_answers_each_request_as_it_would_alone(
    batching: RuntimeServer,
) -> None:
    """``POST /shipyard/batch`` (the async workers' call): one exchange, one
    ``predict_batch()`` for the prediction requests in it, and per request the answer it
    would have got alone, in order: a protocol's own shape, a bad payload's own 400, an
    unknown path's 404."""
    json_headers = {"content-type": "application/json"}

    def part(path: str, payload: Any) -> batchwire.Part:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return batchwire.Part({"path": path, "headers": json_headers}, body)

    status, content_type, body = _batch_call(
        batching,
        [
            part("/predict", {"x": 1}),
            part("/v1/models/batcher:predict", {"instances": [{"x": "v1"}]}),
            part("/predict", b"not json{"),
            part("/nowhere", {"x": 3}),
            part("/predict", {"x": 4}),
        ],
    )
    assert (status, content_type) == (200, batchwire.CONTENT_TYPE)
    answers = [(p.head["status"], json.loads(p.body)) for p in batchwire.decode(body)]
    assert answers[0] == (200, {"x": 1, "batch": 3}), answers
    assert answers[1] == (200, {"predictions": [{"x": "v1", "batch": 3}]})
    assert answers[2][0] == 400 and "JSON" in answers[2][1]["error"]
    assert answers[3][0] == 404 and "no such endpoint" in answers[3][1]["error"]
    assert answers[4] == (200, {"x": 4, "batch": 3})

    # A part that is not a request of a route is refused alone: no batch in a batch
    # (however its path is spelled), headers must be an object.
    status, _, body = _batch_call(
        batching,
        [
            part("/shipyard/batch/", {"x": 1}),
            batchwire.Part({"path": "/predict", "headers": ["x"]}, b"{}"),
            part("/predict", {"x": 2}),
        ],
    )
    answers = [(p.head["status"], json.loads(p.body)) for p in batchwire.decode(body)]
    assert answers[0] == (400, {"error": "a batch cannot hold a batch"}), answers
    assert answers[1][0] == 400 and "headers" in answers[1][1]["error"]
    assert answers[2] == (200, {"x": 2, "batch": 1})

    # A malformed batch is refused as a whole, in JSON, naming what is wrong.
    status, content_type, body = _batch_call(batching, [])
    assert status == 200 and batchwire.decode(body) == []
    with socket.create_connection(("127.0.0.1", batching.port), timeout=30) as sock:
        sock.sendall(_request(batchwire.PATH, b'{"parts": [{"length": 9}]}\nshort'))
        status, error = _read_answer(sock)
    assert status == 400 and "9 bytes announced, 5 left" in error["error"], error
    with socket.create_connection(("127.0.0.1", batching.port), timeout=30) as sock:
        sock.sendall(_request(batchwire.PATH, b"[" * 5000 + b"\n"))
        status, error = _read_answer(sock)
    assert status == 400 and "malformed batch" in error["error"], error
