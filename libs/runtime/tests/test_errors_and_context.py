"""Error mapping (400 vs 500, no tracebacks in responses), serialisation edge cases and the
request context, against a real server running a standard-library model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard_testing import wait_for_sync

from .conftest import TOOLBOX, RuntimeServer, write_model


@pytest.fixture(scope="module")
def toolbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeServer]:
    folder = write_model(tmp_path_factory.mktemp("models") / "toolbox", TOOLBOX)
    server = RuntimeServer(folder, tmp_path_factory.mktemp("logs") / "toolbox.log")
    yield server
    assert server.stop() == 0, server.logs()


def _raw(server: RuntimeServer, payload: Any, headers: dict[str, str] | None = None) -> Any:
    return server.request("POST", "/predict", payload, headers)


def test_other_exceptions_are_500_with_a_generic_message(toolbox: RuntimeServer) -> None:
    status, _, body = _raw(toolbox, {"op": "boom"}, {"X-Request-Id": "req-boom"})
    assert status == 500
    assert body == {
        "error": "predict() failed; the model server log has the details (request id req-boom)"
    }
    text = json.dumps(body)
    assert "secret internal detail" not in text and "Traceback" not in text

    # The traceback is in the log, every line tagged with the worker, next to the id.
    lines = wait_for_sync(
        lambda: [
            line
            for line in toolbox.logs().splitlines()
            if "RuntimeError: secret internal detail" in line
        ],
        message="the traceback in the server log",
    )
    assert lines[0].startswith("ERROR shipyard-runtime[")
    logs = toolbox.logs()
    assert "request req-boom: predict() raised RuntimeError" in logs
    assert "Traceback (most recent call last):" in logs


def test_seldon_500_has_seldon_shape(toolbox: RuntimeServer) -> None:
    status, _, body = toolbox.request("POST", "/api/v1.0/predictions", {"jsonData": {"op": "boom"}})
    assert status == 500
    assert body["status"]["code"] == 500
    assert body["status"]["status"] == "FAILURE"
    assert "secret" not in body["status"]["info"]


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ("bad", "predict() raised ValueError: expected 4 features, got 3"),
        ("missing", "predict() raised KeyError: 'key'"),
    ],
)
def test_caller_errors_from_predict_are_400(toolbox: RuntimeServer, op: str, message: str) -> None:
    payload: dict[str, Any] = {"op": op}
    if op == "missing":
        payload["key"] = "key"
    status, _, body = _raw(toolbox, payload)
    assert (status, body) == (400, {"error": message})


def test_non_finite_floats_become_null(toolbox: RuntimeServer) -> None:
    status, _, body = _raw(toolbox, {"op": "nan"})
    assert (status, body) == (200, [1.5, None, None])


def test_unserialisable_result_is_500_naming_the_type(toolbox: RuntimeServer) -> None:
    status, _, body = _raw(toolbox, {"op": "object"})
    assert status == 500
    assert "not JSON-serialisable" in body["error"]
    assert "object of type object" in body["error"]


def test_context_carries_caller_request_id_and_protocol(toolbox: RuntimeServer) -> None:
    headers = {"X-Forwarded-User": "team-a-client", "X-Request-Id": "abc123"}
    status, _, body = _raw(toolbox, {"op": "context"}, headers)
    assert (status, body) == (
        200,
        {"user": "team-a-client", "request_id": "abc123", "protocol": "raw", "parameters": {}},
    )
    # OIP: the request's own id and parameters reach the model; the id comes back. A
    # single input of shape [] is a scalar payload: here the string "context".
    status, _, body = toolbox.request(
        "POST",
        "/v2/models/toolbox/infer",
        {
            "id": "oip-7",
            "parameters": {"threshold": 0.5},
            "inputs": [{"name": "op", "shape": [], "datatype": "BYTES", "data": ["context"]}],
        },
        {"X-Forwarded-User": "alice"},
    )
    assert status == 200, body
    assert body["id"] == "oip-7"
    assert body["outputs"] == [
        {"name": "user", "shape": [1], "datatype": "BYTES", "data": ["alice"]},
        {"name": "request_id", "shape": [1], "datatype": "BYTES", "data": ["oip-7"]},
        {"name": "protocol", "shape": [1], "datatype": "BYTES", "data": ["v2"]},
        {
            "name": "parameters",
            "shape": [1],
            "datatype": "BYTES",
            "parameters": {"content_type": "json"},
            "data": ['{"threshold":0.5}'],
        },
    ]


def test_oip_multiple_inputs_become_a_dict(toolbox: RuntimeServer) -> None:
    status, _, body = toolbox.request(
        "POST",
        "/v2/models/toolbox/infer",
        {
            "inputs": [
                {"name": "op", "shape": [1], "datatype": "BYTES", "data": ["echo"]},
                {
                    "name": "flags",
                    "shape": [2, 2],
                    "datatype": "BOOL",
                    "data": [True, False, False, True],
                },
                {"name": "ids", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]},
            ],
            "outputs": [{"name": "flags"}, {"name": "ids"}],
        },
    )
    assert status == 200, body
    assert body["outputs"] == [
        {"name": "flags", "shape": [2, 2], "datatype": "BOOL", "data": [True, False, False, True]},
        {"name": "ids", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]},
    ]


def test_context_in_check_and_metadata(toolbox: RuntimeServer) -> None:
    status, _, meta = toolbox.request("GET", "/v2/models/toolbox")
    assert status == 200
    assert meta["parameters"]["accepts_context"] is True
    assert meta["parameters"]["has_predict_batch"] is False


def test_keyword_context_parameter(server_factory: Any, tmp_path: Path) -> None:
    folder = write_model(
        tmp_path / "kw",
        """
        def load(model_dir):
            return None


        def predict(model, payload, *, context=None):
            return context["headers"].get("x-forwarded-user")
        """,
    )
    server = server_factory(folder)
    assert _raw(server, [1], {"X-Forwarded-User": "bob"})[::2] == (200, "bob")
