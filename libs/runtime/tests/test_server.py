"""The real server (a subprocess, 2 workers) serving each example in every protocol shape,
compared with the model loaded in this process."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import (
    EXAMPLES,
    EXPECTED,
    HAS_PREDICT_BATCH,
    ROWS,
    RuntimeServer,
    assert_close,
    send,
)


def _oip_outputs(expected: Any) -> list[dict[str, Any]]:
    """The OIP outputs for a result, built independently of the runtime's codec."""
    items = expected.items() if isinstance(expected, dict) else [("output-0", expected)]
    outputs = []
    for name, value in items:
        if isinstance(value[0], list):
            shape = [len(value), len(value[0])]
            outputs.append(
                {
                    "name": name,
                    "shape": shape,
                    "datatype": "FP64",
                    "data": [x for row in value for x in row],
                }
            )
        else:
            outputs.append(
                {"name": name, "shape": [len(value)], "datatype": "BYTES", "data": value}
            )
    return outputs


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def example(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, RuntimeServer]]:
    name: str = request.param
    server = RuntimeServer(
        EXAMPLES / name, tmp_path_factory.mktemp("logs") / f"{name}.log", "--workers", "2"
    )
    yield name, server
    code = server.stop()
    assert code == 0, f"SIGTERM should stop the server cleanly: {server.logs()}"


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeServer]:
    server = RuntimeServer(
        EXAMPLES / "iris", tmp_path_factory.mktemp("logs") / "iris.log", "--workers", "2"
    )
    yield server
    assert server.stop() == 0, server.logs()


def test_ready_line_names_address_and_workers(example: tuple[str, RuntimeServer]) -> None:
    _, server = example
    assert server.ready_line == f"shipyard-runtime listening on 127.0.0.1:{server.port} workers=2"
    assert len(server.workers()) == 2


def test_oip_infer_matches_the_model_in_process(example: tuple[str, RuntimeServer]) -> None:
    name, server = example
    flat = [x for row in ROWS for x in row]
    status, _, body = server.request(
        "POST",
        f"/v2/models/{name}/infer",
        {
            "id": "req-1",
            "inputs": [
                {"name": "input-0", "shape": [len(ROWS), 4], "datatype": "FP64", "data": flat}
            ],
        },
    )
    assert status == 200, body
    assert body["model_name"] == name
    assert body["id"] == "req-1"
    assert_close(body["outputs"], _oip_outputs(EXPECTED[name](ROWS)))


def test_oip_accepts_nested_data(example: tuple[str, RuntimeServer]) -> None:
    name, server = example
    status, _, body = server.request(
        "POST",
        f"/v2/models/{name}/infer",
        {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": ROWS[2:4]}]},
    )
    assert status == 200, body
    assert_close(body["outputs"], _oip_outputs(EXPECTED[name](ROWS[2:4])))
    assert body["id"]  # one is made up when the request has none


def test_kserve_v1(example: tuple[str, RuntimeServer]) -> None:
    name, server = example
    status, _, body = server.request("POST", f"/v1/models/{name}:predict", {"instances": ROWS})
    assert status == 200, body
    assert_close(body, {"predictions": EXPECTED[name](ROWS)})


def test_seldon_ndarray_and_tensor(example: tuple[str, RuntimeServer]) -> None:
    name, server = example
    expected = EXPECTED[name](ROWS)
    flat = [x for row in ROWS for x in row]
    for data in (
        {"names": ["a", "b", "c", "d"], "ndarray": ROWS},
        {"tensor": {"shape": [len(ROWS), 4], "values": flat}},
    ):
        status, _, body = server.request("POST", "/api/v1.0/predictions", {"data": data})
        assert status == 200, body
        if isinstance(expected, dict):
            assert_close(body, {"jsonData": expected, "meta": {}})
        else:
            assert body == {"data": {"names": [], "ndarray": expected}, "meta": {}}


def test_raw_json(example: tuple[str, RuntimeServer]) -> None:
    name, server = example
    status, headers, body = server.request("POST", "/predict", ROWS)
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    assert_close(body, EXPECTED[name](ROWS))


def test_metadata_health_and_readiness(example: tuple[str, RuntimeServer]) -> None:
    name, server = example
    assert server.request("GET", "/v2/health/live")[:3:2] == (200, {"live": True})
    assert server.request("GET", "/v2/health/ready")[:3:2] == (200, {"ready": True})
    assert server.request("GET", f"/v2/models/{name}/ready")[:3:2] == (
        200,
        {"name": name, "ready": True},
    )
    assert server.request("GET", f"/v1/models/{name}")[:3:2] == (200, {"name": name, "ready": True})
    status, _, meta = server.request("GET", f"/v2/models/{name}")
    assert status == 200
    assert meta["name"] == name
    assert meta["platform"] == "shipyard"
    assert meta["versions"] == []
    assert meta["parameters"]["has_predict_batch"] is HAS_PREDICT_BATCH[name]
    assert meta["parameters"]["script"] == ("score.py" if name == "iris-oci" else "serve.py")
    status, _, server_meta = server.request("GET", "/v2")
    assert status == 200 and server_meta["name"] == "shipyard-runtime"


def test_wrong_feature_count_is_400_in_each_protocol_shape(iris: RuntimeServer) -> None:
    message = "predict() raised ValueError: expected 4 features, got 3"
    row = [5.1, 3.5, 1.4]
    cases: list[tuple[str, Any, Any]] = [
        (
            "/v2/models/iris/infer",
            {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": row}]},
            {"error": message},
        ),
        ("/v1/models/iris:predict", {"instances": [row]}, {"error": message}),
        (
            "/api/v1.0/predictions",
            {"data": {"ndarray": [row]}},
            {"status": {"code": 400, "info": message, "status": "FAILURE"}},
        ),
        ("/predict", [row], {"error": message}),
    ]
    for path, request, expected in cases:
        status, _, body = iris.request("POST", path, request)
        assert (status, body) == (400, expected), path


@pytest.mark.parametrize(
    ("path", "raw", "needle"),
    [
        ("/v2/models/iris/infer", b"{not json", "not valid JSON"),
        ("/v2/models/iris/infer", b"", "empty"),
        ("/v2/models/iris/infer", b'{"input": []}', 'field "inputs" missing'),
        (
            "/v2/models/iris/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3]}]}',
            "inputs[0].data has 3 values but inputs[0].shape [1, 4] needs 4: send 4 values or "
            "fix the shape",
        ),
        (
            "/v2/models/iris/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 4], "data": [1, 2, 3, 4]}]}',
            "inputs[0].datatype is missing",
        ),
        (
            "/v2/models/iris/infer",
            b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1, "a"]}]}',
            "inputs[0].data[1] is 'a', but datatype FP64 needs numbers",
        ),
        ("/v1/models/iris:predict", b'{"rows": []}', 'field "instances" is missing'),
        ("/predict", b"[1, 2", "not valid JSON"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(
    iris: RuntimeServer, path: str, raw: bytes, needle: str
) -> None:
    status, _, body = iris.request("POST", path, raw=raw)
    assert status == 400
    assert needle in body["error"]
    assert "Traceback" not in json.dumps(body)


def test_seldon_errors_have_seldon_shape(iris: RuntimeServer) -> None:
    status, _, body = iris.request(
        "POST",
        "/api/v1.0/predictions",
        {"data": {"tensor": {"shape": [2, 4], "values": [1.0, 2.0, 3.0, 4.0]}}},
    )
    assert status == 400
    assert body["status"]["code"] == 400
    assert body["status"]["status"] == "FAILURE"
    assert (
        "data.tensor.values has 4 values but data.tensor.shape [2, 4] needs 8"
        in (body["status"]["info"])
    )
    status, _, body = iris.request("POST", "/api/v1.0/predictions", {"rows": []})
    assert status == 400 and 'field "data" is missing' in body["status"]["info"]


def test_unknown_model_unknown_path_and_wrong_method(iris: RuntimeServer) -> None:
    status, _, body = iris.request("POST", "/v2/models/wine/infer", {"inputs": []})
    assert status == 404
    assert body == {"error": "model 'wine' not found: this server serves model 'iris'"}
    status, _, body = iris.request("GET", "/v2/models/wine")
    assert status == 404 and "wine" in body["error"]
    status, _, body = iris.request("POST", "/v1/models/wine:predict", {"instances": []})
    assert status == 404 and "wine" in body["error"]

    status, _, body = iris.request("GET", "/nowhere")
    assert status == 404
    assert "/v2/models/iris" in body["error"]

    status, headers, body = iris.request("GET", "/v2/models/iris/infer")
    assert status == 405
    assert headers["allow"] == "POST"
    assert "use POST" in body["error"]
    status, headers, body = iris.request("DELETE", "/api/v1.0/predictions")
    assert status == 405
    assert body["status"]["code"] == 405


def test_body_over_the_limit_is_413(iris: RuntimeServer) -> None:
    # The default limit is 32 MiB: one byte more is refused, in the protocol's shape, and
    # the client still reads the answer although the server did not read the body.
    too_big = b"[" + b" " * (32 * 1024 * 1024 - 1) + b"]"
    status, headers, body = iris.request("POST", "/v2/models/iris/infer", raw=too_big)
    assert status == 413
    assert "over the limit of 33554432 bytes (32 MiB)" in body["error"]
    assert headers["connection"] == "close"

    # With Expect: 100-continue the refusal comes before the body is sent.
    conn = http.client.HTTPConnection("127.0.0.1", iris.port, timeout=10)
    try:
        conn.putrequest("POST", "/api/v1.0/predictions")
        conn.putheader("Content-Length", str(64 * 1024 * 1024))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["status"]["code"] == 413
    finally:
        conn.close()


def test_keep_alive_reuses_one_connection(iris: RuntimeServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", iris.port, timeout=10)
    try:
        send(conn, "GET", "/v2/health/ready")
        first_socket = conn.sock
        for _ in range(50):
            status, _, body = send(conn, "POST", "/predict", ROWS[:1])
            assert (status, body) == (200, EXPECTED["iris"](ROWS[:1]))
        assert conn.sock is first_socket  # http.client reconnects silently otherwise
    finally:
        conn.close()


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-response"
        buffer += chunk
    end = buffer.index(b"\r\n\r\n")
    head = bytes(buffer[:end]).decode()
    length = int(
        next(
            line for line in head.split("\r\n") if line.lower().startswith("content-length:")
        ).split(":")[1]
    )
    while len(buffer) < end + 4 + length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        buffer += chunk
    body = bytes(buffer[end + 4 : end + 4 + length])
    del buffer[: end + 4 + length]
    return int(head.split(" ")[1]), body


def test_pipelined_requests_are_answered_in_order(iris: RuntimeServer) -> None:
    requests = b""
    for row in ROWS[:3]:
        body = json.dumps([row]).encode()
        requests += (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
    with socket.create_connection(("127.0.0.1", iris.port), timeout=10) as sock:
        sock.sendall(requests)  # all three in one write
        buffer = bytearray()
        answers = [_read_response(sock, buffer) for _ in range(3)]
    assert answers == [
        (200, json.dumps(EXPECTED["iris"]([row])).encode().replace(b" ", b"")) for row in ROWS[:3]
    ]


def test_chunked_request_body(iris: RuntimeServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", iris.port, timeout=10)
    try:
        body = json.dumps({"instances": ROWS}).encode()
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        conn.request("POST", "/v1/models/iris:predict", body=iter(pieces), encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read()) == {"predictions": EXPECTED["iris"](ROWS)}
    finally:
        conn.close()


def test_http_1_0_closes_unless_keep_alive_is_asked(iris: RuntimeServer) -> None:
    with socket.create_connection(("127.0.0.1", iris.port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):  # ends when the server closes
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" in data

    with socket.create_connection(("127.0.0.1", iris.port), timeout=10) as sock:
        buffer = bytearray()
        for _ in range(2):
            sock.sendall(b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert _read_response(sock, buffer) == (200, b'{"live":true}')


def test_head_and_query_strings(iris: RuntimeServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", iris.port, timeout=10)
    try:
        conn.request("HEAD", "/v2/health/ready")
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == b""
        assert int(response.getheader("content-length") or 0) == len(b'{"ready":true}')
        # A 404 to HEAD has no body either, and the connection stays usable.
        conn.request("HEAD", "/v2/models/wine")
        response = conn.getresponse()
        assert (response.status, response.read()) == (404, b"")
        assert send(conn, "GET", "/v2/models/iris/ready?verbose=1")[0] == 200
    finally:
        conn.close()


def test_malformed_http_is_400_and_closed(iris: RuntimeServer) -> None:
    with socket.create_connection(("127.0.0.1", iris.port), timeout=10) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"malformed request line" in data
    with socket.create_connection(("127.0.0.1", iris.port), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
