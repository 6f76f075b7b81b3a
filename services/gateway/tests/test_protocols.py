"""The REST protocols end to end: Open Inference Protocol v2, KServe v1, Seldon and raw
JSON through a real gateway to real model servers (examples/iris, named ``iris``)."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipyard_gateway.main import GatewayHost
from shipyard_gateway.protocols import OIP_DATATYPES
from shipyard_testing import wait_for

from .conftest import FakeScheduler, ModelServer, publish, route
from .test_gateway import ROWS, expected_iris

FLAT = [value for row in ROWS for value in row]


async def call(
    http: aiohttp.ClientSession,
    host: GatewayHost,
    method: str,
    path: str,
    payload: Any = None,
    **kw: Any,
) -> tuple[int, Any, Any]:
    """One request; returns status, decoded JSON body, headers."""
    if payload is not None:
        kw["json"] = payload
    async with http.request(method, f"{host.http_url}{path}", **kw) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def oip(data: Any = FLAT, shape: Any = (3, 4), datatype: str = "FP64") -> dict[str, Any]:
    """An OIP infer request with one input."""
    return {
        "id": "req-1",
        "inputs": [{"name": "input-0", "shape": list(shape), "datatype": datatype, "data": data}],
    }


@pytest.fixture
async def served(
    gateway: GatewayHost, scheduler: FakeScheduler, iris: list[ModelServer]
) -> GatewayHost:
    """The gateway routing ``iris`` (revision 3) to an iris model server."""
    await publish(scheduler, gateway, route("iris", iris[0].address, revision=3))
    return gateway


# --- Open Inference Protocol v2 -----------------------------------------------------------


async def test_oip_infer(served: GatewayHost, http: aiohttp.ClientSession) -> None:
    status, body, headers = await call(http, served, "POST", "/v2/models/iris/infer", oip())
    assert status == 200
    assert body["model_name"] == "iris" and body["id"] == "req-1"
    [output] = body["outputs"]
    assert output["data"] == expected_iris(ROWS)
    assert (output["shape"], output["datatype"]) == ([3], "BYTES")
    assert headers["X-Request-Id"]
    # Nested data and the active revision as the version work too.
    status, body, _ = await call(
        http, served, "POST", "/v2/models/iris/versions/3/infer", oip(data=ROWS)
    )
    assert (status, body["outputs"][0]["data"]) == (200, expected_iris(ROWS))


async def test_oip_errors_are_the_gateways_own_400s(
    served: GatewayHost, http: aiohttp.ClientSession
) -> None:
    path = "/v2/models/iris/infer"
    cases: list[tuple[Any, str]] = [
        (oip(shape=(1, 4)), "inputs[0].data has 12 values but inputs[0].shape [1, 4] needs 4"),
        (oip(datatype="FLOAT"), "'FLOAT' is not an OIP datatype"),
        ({"inputs": []}, 'field "inputs" must be a non-empty list'),
        ([1, 2], "must be a JSON object"),
        ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP64", "data": []}]}, "shape"),
    ]
    for payload, message in cases:
        status, body, _ = await call(http, served, "POST", path, payload)
        assert status == 400, payload
        assert set(body) == {"error"} and message in body["error"], body
    status, body, _ = await call(http, served, "POST", path, data=b'{"inputs": [')
    assert status == 400 and body["error"].startswith("the request body is not valid JSON")


async def test_oip_model_error_passes_through(
    served: GatewayHost, http: aiohttp.ClientSession
) -> None:
    payload = oip(data=[1.0, 2.0, 3.0], shape=(1, 3))
    status, body, _ = await call(http, served, "POST", "/v2/models/iris/infer", payload)
    assert (status, body) == (
        400,
        {"error": "predict() raised ValueError: expected 4 features, got 3"},
    )


async def test_oip_unknown_deployment_and_version(
    served: GatewayHost, http: aiohttp.ClientSession
) -> None:
    status, body, _ = await call(http, served, "POST", "/v2/models/nope/infer", oip())
    assert (status, body) == (
        404,
        {"error": "deployment 'nope' does not exist; see `shipyard deploy list`"},
    )
    status, body, _ = await call(http, served, "POST", "/v2/models/iris/versions/2/infer", oip())
    assert status == 404 and "serves version 3" in body["error"]
    status, body, _ = await call(http, served, "GET", "/v2/models/nope/ready")
    assert status == 404 and set(body) == {"error"}


async def test_oip_metadata_and_readiness(
    served: GatewayHost, scheduler: FakeScheduler, http: aiohttp.ClientSession
) -> None:
    status, body, _ = await call(http, served, "GET", "/v2/models/iris")
    assert status == 200
    assert (body["name"], body["versions"], body["platform"]) == ("iris", ["3"], "shipyard")
    assert (await call(http, served, "GET", "/v2/models/iris/versions/3"))[0] == 200
    status, body, _ = await call(http, served, "GET", "/v2/models/iris/ready")
    assert (status, body) == (200, {"name": "iris", "ready": True})
    assert (await call(http, served, "GET", "/v2/models/iris/versions/3/ready"))[0] == 200

    # Scaled to zero: not ready, and the probe wakes it.
    await publish(scheduler, served, route("sleepy", scaled_to_zero=True))
    status, body, _ = await call(http, served, "GET", "/v2/models/sleepy/ready")
    assert (status, body) == (503, {"name": "sleepy", "ready": False})
    await wait_for(lambda: scheduler.activations == ["sleepy"], message="the probe woke it")

    status, body, _ = await call(http, served, "GET", "/v2")
    assert (status, body["name"], body["extensions"]) == (200, "shipyard", [])
    assert body["version"]
    assert (await call(http, served, "GET", "/v2/health/live"))[1] == {"live": True}
    assert (await call(http, served, "GET", "/v2/health/ready"))[1] == {"ready": True}


# --- KServe v1 ----------------------------------------------------------------------------


async def test_kserve_v1(served: GatewayHost, http: aiohttp.ClientSession) -> None:
    path = "/v1/models/iris:predict"
    status, body, _ = await call(http, served, "POST", path, {"instances": ROWS})
    assert (status, body) == (200, {"predictions": expected_iris(ROWS)})
    status, body, _ = await call(http, served, "GET", "/v1/models/iris")
    assert (status, body) == (200, {"name": "iris", "ready": True})

    status, body, _ = await call(http, served, "POST", path, {"inputs": ROWS})
    assert status == 400 and 'field "instances" is missing' in body["error"]
    status, body, _ = await call(http, served, "POST", path, {"instances": {"a": 1}})
    assert status == 400 and "must be a list" in body["error"]
    status, body, _ = await call(http, served, "POST", path, data=b"not json")
    assert status == 400 and "not valid JSON" in body["error"]
    status, body, _ = await call(http, served, "POST", path, {"instances": [[1, 2, 3]]})
    assert (status, body) == (
        400,
        {"error": "predict() raised ValueError: expected 4 features, got 3"},
    )
    status, body, _ = await call(http, served, "POST", "/v1/models/nope:predict", {"instances": []})
    assert status == 404 and set(body) == {"error"}
    status, body, headers = await call(http, served, "GET", path)
    assert status == 405 and headers["Allow"] == "POST"


# --- Seldon -------------------------------------------------------------------------------


async def test_seldon(served: GatewayHost, http: aiohttp.ClientSession) -> None:
    path = "/deployment/iris/api/v1.0/predictions"
    status, body, _ = await call(http, served, "POST", path, {"data": {"ndarray": ROWS}})
    assert status == 200
    assert body == {"data": {"names": [], "ndarray": expected_iris(ROWS)}, "meta": {}}
    tensor = {"data": {"names": ["a", "b", "c", "d"], "tensor": {"shape": [3, 4], "values": FLAT}}}
    status, body, _ = await call(http, served, "POST", path, tensor)
    assert (status, body["data"]["ndarray"]) == (200, expected_iris(ROWS))


def seldon_failure(body: Any, code: int) -> str:
    """The message of a Seldon error document, after checking its shape."""
    status = body["status"]
    assert set(status) == {"code", "info", "reason", "status"}, body
    assert (status["code"], status["status"]) == (code, "FAILURE")
    return str(status["info"])


async def test_seldon_errors_have_seldons_shape(
    served: GatewayHost, http: aiohttp.ClientSession
) -> None:
    path = "/deployment/iris/api/v1.0/predictions"
    wrong_shape = {"data": {"tensor": {"shape": [2, 4], "values": FLAT}}}
    status, body, _ = await call(http, served, "POST", path, wrong_shape)
    assert status == 400
    assert "data.tensor.values has 12 values but data.tensor.shape [2, 4] needs 8" in (
        seldon_failure(body, 400)
    )
    assert body["status"]["reason"] == "BAD_REQUEST"
    status, body, _ = await call(http, served, "POST", path, data=b"{")
    assert "not valid JSON" in seldon_failure(body, 400)
    status, body, _ = await call(http, served, "POST", path, {"ndarray": ROWS})
    assert 'field "data" is missing' in seldon_failure(body, 400)
    # The model's own error, from the model server, gets the same shape (reason added).
    status, body, _ = await call(http, served, "POST", path, {"data": {"ndarray": [[1, 2]]}})
    assert seldon_failure(body, 400) == "predict() raised ValueError: expected 4 features, got 2"
    status, body, _ = await call(
        http, served, "POST", "/deployment/nope/api/v1.0/predictions", {"data": {"ndarray": []}}
    )
    assert status == 404 and "'nope' does not exist" in seldon_failure(body, 404)
    assert body["status"]["reason"] == "NOT_FOUND"
    # aiohttp's own refusals on Seldon paths too.
    status, body, _ = await call(http, served, "GET", path)
    assert status == 405 and "not allowed" in seldon_failure(body, 405)


# --- raw JSON -----------------------------------------------------------------------------


async def test_raw_json_is_passed_through(served: GatewayHost, http: aiohttp.ClientSession) -> None:
    path = "/deployments/iris/predict"
    assert (await call(http, served, "POST", path, ROWS))[:2] == (200, expected_iris(ROWS))
    # Not parsed by the gateway: the model server's own 400.
    status, body, _ = await call(http, served, "POST", path, data=b"{not json")
    assert status == 400 and body["error"].startswith("the request body is not valid JSON")


# --- fuzzing ------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
_shapes = st.lists(st.integers(-2, 6), max_size=3)
_datatypes = st.sampled_from(sorted(OIP_DATATYPES)) | st.text(max_size=6)
_numbers = st.lists(st.floats(-10, 10) | st.integers(-5, 5), max_size=12)
_tensor_data = _numbers | st.lists(_numbers, max_size=4) | _json_values

_oip_bodies = st.fixed_dictionaries(
    {
        "inputs": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": st.text(max_size=5),
                    "shape": _shapes | _json_values,
                    "datatype": _datatypes,
                    "data": _tensor_data,
                },
            ),
            max_size=3,
        )
        | _json_values
    },
    optional={"id": _json_values, "parameters": _json_values, "outputs": _json_values},
)
_v1_bodies = st.fixed_dictionaries({"instances": _tensor_data | st.lists(_numbers, max_size=3)})
_seldon_bodies = st.fixed_dictionaries(
    {
        "data": st.fixed_dictionaries(
            {},
            optional={
                "names": _json_values,
                "ndarray": _tensor_data,
                "tensor": st.fixed_dictionaries(
                    {}, optional={"shape": _shapes | _json_values, "values": _tensor_data}
                )
                | _json_values,
            },
        )
        | _json_values
    }
)


def _bodies(shaped: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    as_json = (shaped | _json_values).map(lambda value: json.dumps(value).encode())
    return as_json | st.binary(max_size=64)


ROUTES = [
    ("/v2/models/iris/infer", _bodies(_oip_bodies), "error"),
    ("/v1/models/iris:predict", _bodies(_v1_bodies), "error"),
    ("/deployment/iris/api/v1.0/predictions", _bodies(_seldon_bodies), "status"),
    ("/deployments/iris/predict", _bodies(_json_values), "error"),
]


@pytest.mark.parametrize(("path", "bodies", "error_key"), ROUTES)
async def test_generated_bodies_never_get_a_5xx(
    served: GatewayHost, path: str, bodies: st.SearchStrategy[bytes], error_key: str
) -> None:
    port = served.http_port
    seen: dict[int, int] = {}

    # A blocking client in a thread: hypothesis drives a plain function, while this
    # event loop keeps serving the gateway.
    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(body=bodies)
    def check(body: bytes) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
        finally:
            connection.close()
        seen[response.status] = seen.get(response.status, 0) + 1
        assert response.status < 500, (body, answer)
        assert b"Traceback" not in answer and b'File "' not in answer, answer
        if response.status >= 400:
            assert error_key in json.loads(answer), answer

    await asyncio.to_thread(check)
    assert sum(seen.values()) >= 60
    assert any(400 <= status < 500 for status in seen), seen


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
async def test_generated_credentials_never_get_a_5xx(
    served: GatewayHost, scheduler: FakeScheduler, iris: list[ModelServer], header: str
) -> None:
    await publish(scheduler, served, route("closed", iris[0].address, public=False))
    port = served.http_port
    printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
        str.strip
    )
    values = (
        printable
        | st.builds(lambda s: f"Basic {s}", printable)
        | st.builds(lambda s: f"Bearer {s}", printable)
    )

    @settings(max_examples=60, deadline=None, database=None)
    @given(value=values)
    def check(value: str) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request(
                "POST", "/deployments/closed/predict", json.dumps(ROWS), {header: value}
            )
            response = connection.getresponse()
            answer = response.read()
        finally:
            connection.close()
        assert response.status in (401, 403), (value, response.status, answer)
        assert b"Traceback" not in answer

    await asyncio.to_thread(check)
