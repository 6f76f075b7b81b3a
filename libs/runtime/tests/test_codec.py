"""Conversions between the protocols' shapes and predict()'s payloads and results (unit)."""

from __future__ import annotations

import argparse
import datetime
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shipyard_runtime import codec
from shipyard_runtime.__main__ import parse_size
from shipyard_runtime.app import App
from shipyard_runtime.codec import NotSerializableError, RequestError
from shipyard_runtime.model import import_script, load_model

from .conftest import write_model


def _tensor(shape: list[int], datatype: str, data: Any, name: str = "x") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


# -- OIP requests --------------------------------------------------------------------


def test_one_input_becomes_a_nested_list_reshaped_row_major() -> None:
    request = codec.oip_request({"inputs": [_tensor([2, 3], "FP64", [1.5, 2, 3, 4, 5, 6])]})
    assert request.payload == [[1.5, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert all(type(x) is float for row in request.payload for x in row)


def test_nested_data_is_accepted_and_reshaped_by_shape() -> None:
    request = codec.oip_request({"inputs": [_tensor([3, 2], "INT64", [[1, 2, 3], [4, 5, 6]])]})
    assert request.payload == [[1, 2], [3, 4], [5, 6]]


def test_several_inputs_become_a_dict_by_name() -> None:
    request = codec.oip_request(
        {
            "id": 42,
            "parameters": {"a": 1},
            "outputs": [{"name": "y"}],
            "inputs": [
                _tensor([2], "BYTES", ["a", "b"], "text"),
                _tensor([1, 2], "BOOL", [True, False], "mask"),
            ],
        }
    )
    assert request.payload == {"text": ["a", "b"], "mask": [[True, False]]}
    assert (request.id, request.parameters, request.outputs) == ("42", {"a": 1}, ["y"])


@pytest.mark.parametrize(
    ("shape", "data", "payload"),
    [
        ([], [7.5], 7.5),
        ([0, 4], [], []),
        ([2, 0], [], [[], []]),
        ([1, 1, 2], [1.0, 2.0], [[[1.0, 2.0]]]),
    ],
)
def test_edge_shapes(shape: list[int], data: list[Any], payload: Any) -> None:
    assert codec.oip_request({"inputs": [_tensor(shape, "FP32", data)]}).payload == payload


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "the request body must be a JSON object"),
        ({}, 'field "inputs" missing'),
        ({"inputs": []}, 'field "inputs" must be a non-empty list'),
        ({"inputs": [1]}, "inputs[0] must be an object"),
        (
            {"inputs": [{"shape": [1], "datatype": "FP64", "data": [1]}]},
            "inputs[0].name is missing",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP64", "data": [1]}]},
            "inputs[0].shape is missing",
        ),
        ({"inputs": [_tensor([-1, 4], "FP64", [1])]}, "inputs[0].shape must be a list of non-neg"),
        ({"inputs": [_tensor([1], "FLOAT", [1])]}, "inputs[0].datatype 'FLOAT' is not an OIP"),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP64"}]},
            "inputs[0].data is missing",
        ),
        ({"inputs": [_tensor([1], "FP64", 1.0)]}, "inputs[0].data must be a list"),
        (
            {"inputs": [_tensor([2, 2], "FP64", [1, 2, 3])]},
            "inputs[0].data has 3 values but inputs[0].shape [2, 2] needs 4: send 4 values or "
            "fix the shape",
        ),
        ({"inputs": [_tensor([2], "INT32", [1, 2.5])]}, "inputs[0].data[1] is 2.5, but datatype"),
        ({"inputs": [_tensor([1], "BOOL", [1])]}, "datatype BOOL needs true/false"),
        ({"inputs": [_tensor([1], "BYTES", [1])]}, "datatype BYTES needs strings"),
        ({"inputs": [_tensor([1], "FP64", [True])]}, "datatype FP64 needs numbers"),
        (
            {"inputs": [_tensor([1], "FP64", [1]), _tensor([1], "FP64", [2])]},
            "inputs[1].name 'x' is used twice",
        ),
        ({"inputs": [_tensor([1], "FP64", [1])], "outputs": ["y"]}, 'field "outputs" must be'),
        ({"inputs": [_tensor([1], "FP64", [1])], "parameters": []}, '"parameters" must be'),
    ],
)
def test_bad_oip_requests_name_the_field(body: Any, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        codec.oip_request(body)
    assert caught.value.status == 400
    assert message in caught.value.message


def test_integral_floats_are_accepted_as_integers() -> None:
    payload = codec.oip_request({"inputs": [_tensor([2], "INT64", [1.0, 2])]}).payload
    assert payload == [1, 2] and all(type(x) is int for x in payload)


# -- OIP responses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "tensor"),
    [
        (
            ["setosa", "virginica"],
            {"shape": [2], "datatype": "BYTES", "data": ["setosa", "virginica"]},
        ),
        ([[1, 2], [3, 4]], {"shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}),
        ([[1, 2.5]], {"shape": [1, 2], "datatype": "FP64", "data": [1, 2.5]}),
        ([True, False], {"shape": [2], "datatype": "BOOL", "data": [True, False]}),
        (3.5, {"shape": [1], "datatype": "FP64", "data": [3.5]}),
        ("yes", {"shape": [1], "datatype": "BYTES", "data": ["yes"]}),
        ([], {"shape": [0], "datatype": "FP64", "data": []}),
        ((1, 2), {"shape": [2], "datatype": "INT64", "data": [1, 2]}),
        (
            np.arange(6, dtype=np.int32).reshape(2, 3),
            {"shape": [2, 3], "datatype": "INT64", "data": [0, 1, 2, 3, 4, 5]},
        ),
        (np.float32(0.5), {"shape": [1], "datatype": "FP64", "data": [0.5]}),
        ([np.float64(1.5), np.int64(2)], {"shape": [2], "datatype": "FP64", "data": [1.5, 2]}),
    ],
)
def test_results_become_typed_tensors(result: Any, tensor: dict[str, Any]) -> None:
    assert codec.oip_outputs(result) == [{"name": "output-0", **tensor}]


def test_non_tensor_results_become_json_strings() -> None:
    ragged = codec.oip_outputs([[1, 2], [3]])
    records = codec.oip_outputs([{"label": "a"}, None])
    assert ragged == [
        {
            "name": "output-0",
            "shape": [2],
            "datatype": "BYTES",
            "parameters": {"content_type": "json"},
            "data": ["[1,2]", "[3]"],
        }
    ]
    assert records[0]["data"] == ['{"label":"a"}', "null"]


def test_dict_results_give_one_output_per_key_and_outputs_selects() -> None:
    result = {"label": np.array(["a", "b"]), "proba": np.array([[0.25, 0.75], [1.0, 0.0]])}
    assert codec.oip_outputs(result) == [
        {"name": "label", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
        {"name": "proba", "shape": [2, 2], "datatype": "FP64", "data": [0.25, 0.75, 1.0, 0.0]},
    ]
    assert [o["name"] for o in codec.oip_outputs(result, ["proba"])] == ["proba"]
    with pytest.raises(RequestError, match="asks for 'nope', which the model does not return"):
        codec.oip_outputs(result, ["nope"])


@given(
    st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=4).flatmap(
        lambda shape: st.tuples(
            st.just(shape),
            st.lists(
                st.floats(allow_nan=False, allow_infinity=False, width=64),
                min_size=math.prod(shape),
                max_size=math.prod(shape),
            ),
        )
    )
)
def test_request_and_response_tensors_round_trip(case: tuple[list[int], list[float]]) -> None:
    shape, flat = case
    payload = codec.oip_request({"inputs": [_tensor(shape, "FP64", flat)]}).payload
    # Nested exactly as numpy would reshape it, and back to the same tensor.
    assert np.array(payload, dtype=np.float64).shape == tuple(shape)
    assert np.array(payload).ravel().tolist() == flat
    (output,) = codec.oip_outputs(payload)
    assert (output["shape"], output["data"], output["datatype"]) == (shape, flat, "FP64")


def test_tensor_metadata_marks_the_batch_dimension() -> None:
    assert codec.tensor_metadata([[5.1, 3.5, 1.4, 0.2]], "input-0") == [
        {"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}
    ]
    assert codec.tensor_metadata({"a": "text", "b": [1, 2]}, "x") == [
        {"name": "a", "datatype": "BYTES", "shape": [1]},
        {"name": "b", "datatype": "INT64", "shape": [-1]},
    ]


# -- KServe v1 and Seldon ------------------------------------------------------------


def test_kserve_payload_is_the_instances() -> None:
    assert codec.kserve_payload({"instances": [[1, 2]]}) == [[1, 2]]
    with pytest.raises(RequestError, match='field "instances" is missing'):
        codec.kserve_payload({"inputs": [[1, 2]]})
    with pytest.raises(RequestError, match='field "instances" must be a list'):
        codec.kserve_payload({"instances": {"a": 1}})


def test_seldon_payloads() -> None:
    assert codec.seldon_payload({"data": {"names": ["a", "b"], "ndarray": [[1, 2]]}}) == [[1, 2]]
    assert codec.seldon_payload(
        {"data": {"tensor": {"shape": [2, 2], "values": [1, 2, 3, 4]}}}
    ) == [[1, 2], [3, 4]]
    assert codec.seldon_payload({"jsonData": {"k": 1}}) == {"k": 1}
    assert codec.seldon_payload({"strData": "hello"}) == "hello"
    with pytest.raises(RequestError, match='field "data" needs "ndarray" or "tensor"'):
        codec.seldon_payload({"data": {"names": []}})
    with pytest.raises(RequestError, match=r'"data\.tensor" needs "shape" and "values"'):
        codec.seldon_payload({"data": {"tensor": {"values": [1]}}})


def test_seldon_responses() -> None:
    assert codec.seldon_response([[0.1, 0.9]]) == {
        "data": {"names": ["t:0", "t:1"], "ndarray": [[0.1, 0.9]]},
        "meta": {},
    }
    assert codec.seldon_response(np.array(["a"])) == {
        "data": {"names": [], "ndarray": ["a"]},
        "meta": {},
    }
    assert codec.seldon_response({"k": 1}) == {"jsonData": {"k": 1}, "meta": {}}


# -- JSON ----------------------------------------------------------------------------


def test_dumps_handles_numpy_sets_dates_and_non_finite_floats() -> None:
    assert codec.dumps({"a": np.array([1, 2]), "b": np.float32(0.5), "c": np.bool_(True)}) == (
        b'{"a":[1,2],"b":0.5,"c":true}'
    )
    assert codec.dumps({"s": {3}, "d": datetime.date(2024, 1, 2)}) == b'{"s":[3],"d":"2024-01-02"}'
    assert codec.dumps([1.0, float("nan"), np.array([np.inf])]) == b"[1.0,null,[null]]"


class _Opaque:
    pass


def test_dumps_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(NotSerializableError, match="object of type _Opaque is not JSON-serial"):
        codec.dumps({"model": _Opaque()})


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"", "empty"), (b"{", "not valid JSON"), (b"\xff\xfe", "not valid JSON")],
)
def test_loads_names_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        codec.loads(body)


def test_loads_forgives_a_bom() -> None:
    assert codec.loads(b"\xef\xbb\xbf[1]") == [1]


# -- routing (in-process) ------------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> App:
    folder = write_model(
        tmp_path / "m",
        """
        def load(model_dir):
            return 10


        def predict(model, payload):
            return [x * model for x in payload]
        """,
    )
    script = import_script(folder / "serve.py")
    return App(load_model(script, folder), "my-model")


def test_routes_match_exact_encoded_and_trailing_slash_paths(app: App) -> None:
    assert app.resolve("/v1/models/my-model:predict").allow == "POST"
    assert app.resolve("/v1/models/my-model%3Apredict").allow == "POST"
    assert app.resolve("/v2/models/my-model/ready/").allow == "GET"
    assert app.resolve("/v2/models/my-model/infer?x=1").allow == "POST"
    status, body = app.resolve("/v2/models/other/infer").methods["POST"]({}, b"")
    assert status == 404
    assert b"model 'other' not found" in body
    assert app.resolve("/metrics").methods == {}


def test_handlers_answer_in_their_protocol(app: App) -> None:
    handler = app.resolve("/v1/models/my-model:predict").methods["POST"]
    assert handler({}, b'{"instances": [1, 2]}') == (200, b'{"predictions":[10,20]}')
    seldon = app.resolve("/api/v1.0/predictions").methods["POST"]
    status, body = seldon({}, b'{"data": {"ndarray": ["a", 1]}}')
    assert status == 200  # "a" * 10 is a string: fine for the model
    status, body = seldon({}, b'{"data": {"ndarray": [null]}}')
    assert status == 400
    assert body.startswith(b'{"status":{"code":400,"info":"predict() raised TypeError')


def test_parse_size() -> None:
    assert parse_size("33554432") == 32 << 20
    assert parse_size("32MiB") == 32 << 20
    assert parse_size("512k") == 512 << 10
    assert parse_size("1G") == 1 << 30
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
