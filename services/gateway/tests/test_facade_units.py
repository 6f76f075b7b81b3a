"""The REST facade without databases: the route table and its document, the translation
REST ↔ gRPC, the status table, and the refusals the facade makes itself. The gRPC side
is a stand-in server answering every method of the four services (see facade_conftest)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import jsonschema
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from shipyard.imagebuild.v1 import imagebuild_pb2 as ib
from shipyard.keys.v1 import client_keys_pb2 as ck
from shipyard.quota.v1 import quota_pb2 as qp
from shipyard.scheduler.v1 import scheduler_pb2 as sp
from shipyard_gateway.facade import HTTP_STATUS_FOR_GRPC, ROUTES, Api, build_facade
from shipyard_gateway.facade.routes import BACKENDS
from shipyard_gateway.facade.schema import SUPPORTED_KEYWORDS
from shipyard_testing import folder_tar

from .facade_conftest import (
    Conformance,
    RestClient,
    StandIn,
    serve_facade,
    stand_in_server,
)

TOKENS = {"ana": "ana-token", "admin": "admin-token"}

# gRPC methods deliberately without a REST route, and why. A new method in a proto fails
# test_every_method_is_routed_or_excluded until it gets a route or a line here.
NOT_ROUTED = {
    "IdentityService.CreateUser": "admin user management stays in the CLI/gRPC",
    "IdentityService.ListUsers": "admin user management stays in the CLI/gRPC",
    "IdentityService.IssueToken": "tokens are issued through the CLI/gRPC",
    "IdentityService.RevokeToken": "tokens are revoked through the CLI/gRPC",
    "IdentityService.CreateGroup": "admin group management stays in the CLI/gRPC",
    "IdentityService.AddMember": "admin group management stays in the CLI/gRPC",
    "IdentityService.RemoveMember": "admin group management stays in the CLI/gRPC",
    "IdentityService.Authenticate": "internal: every service's auth interceptor",
    "ClientKeyService.VerifyClientKey": "internal: the gateway's data plane",
    "QuotaService.Reserve": "internal: the scheduler reserves",
    "QuotaService.Release": "internal: the scheduler releases",
    "SchedulerService.WatchRoutes": "internal: the gateway's routing table",
    "LogService.FollowLogs": "a live stream: the gRPC API or `shipyard deploy logs --follow`",
    "LogService.DownloadLogs": "a whole log: the gRPC API or `shipyard deploy logs --download`",
    "SchedulerService.Activate": "internal: the gateway wakes scaled-to-zero deployments",
}


@dataclass
class Rig:
    """A stand-in backend, the facade over it, and a client."""

    stand_in: StandIn
    client: RestClient
    base_url: str


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with stand_in_server() as (stand_in, addresses):
        options = {"call_timeout": 2.0, "max_json_bytes": 64 * 1024}
        async with serve_facade(addresses, **options) as base_url, aiohttp.ClientSession() as s:
            conformance = Conformance(Api().document("/api/v1"))
            yield Rig(stand_in, RestClient(base_url, s, TOKENS, conformance), base_url)


def _answer(message: Message) -> Any:
    async def behaviour(request: Message, context: grpc.aio.ServicerContext) -> Message:
        return message

    return behaviour


def _abort(code: grpc.StatusCode, details: str) -> Any:
    async def behaviour(request: Message, context: grpc.aio.ServicerContext) -> Message:
        await context.abort(code, details)
        raise AssertionError("abort returns no more")

    return behaviour


# --- the table and the document -------------------------------------------------------------


def test_every_method_is_routed_or_excluded() -> None:
    routed = {f"{r.backend.service.name}.{r.rpc}" for r in ROUTES if r.backend is not None}
    every = {f"{b.service.name}.{m.name}" for b in BACKENDS for m in b.service.methods}
    assert every - routed == set(NOT_ROUTED)
    assert routed <= every


def test_served_routes_are_the_documented_ones() -> None:
    app = build_facade({"keys_addr": "x:1", "quota_addr": "x:1", "imagebuild_addr": "x:1",
                        "scheduler_addr": "x:1", "logging_addr": "x:1"})  # fmt: skip
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "*" and route.resource is not None
    }
    document = Api().document("/api/v1")
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert served == documented
    assert len(documented) == len(ROUTES)


def test_without_the_logging_service_its_routes_are_left_out() -> None:
    app = build_facade({"keys_addr": "x:1", "quota_addr": "x:1", "imagebuild_addr": "x:1",
                        "scheduler_addr": "x:1"})  # fmt: skip
    served = {route.resource.canonical for route in app.router.routes() if route.resource}
    assert "/deployments/{name}/history" in served
    assert not {
        p
        for p in served
        if p.startswith("/deployments/") and p.endswith(("/logs", "/log-sources", "/metrics"))
    }


def test_document_is_valid_openapi_31() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    document = Api().document("/api/v1")
    assert document["openapi"].startswith("3.1")
    validator.validate(document)
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    # Every operation documents its errors with the one error schema.
    for path, item in document["paths"].items():
        for method, op in item.items():
            if path == "/openapi.json":
                assert op["security"] == []
                continue
            assert {"400", "401", "404", "default"} <= set(op["responses"]), (method, path)


def test_component_schemas_use_only_what_the_validator_knows() -> None:
    api = Api()

    def walk(schema: Any, where: str) -> None:
        assert isinstance(schema, dict), where
        unknown = set(schema) - SUPPORTED_KEYWORDS
        assert not unknown, f"{where} uses {unknown}"
        jsonschema.Draft202012Validator.check_schema(schema)
        for name, sub in schema.get("properties", {}).items():
            walk(sub, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                walk(schema[key], f"{where}.{key}")

    for name, schema in api.schemas.components.items():
        walk(schema, name)


def test_examples_are_valid_input() -> None:
    api = Api()
    checked = 0
    for op in api.operations:
        body = op.route.body
        if body is not None and body.example is not None:
            assert op.body_schema is not None
            api.schemas.validate(body.example, op.body_schema, "")
            checked += 1
        for param, schema in op.params:
            if param.example is not None:
                api.schemas.validate(param.example, schema, param.name)
                checked += 1
    assert checked > 10


def test_api_refuses_a_route_without_such_a_method() -> None:
    from shipyard_gateway.facade.routes import SCHEDULER, Route

    with pytest.raises(ValueError, match="no method"):
        Api((Route("GET", "/x", "x", "x", "x", SCHEDULER, "NoSuchMethod"),))
    with pytest.raises(ValueError, match="not a unary"):
        Api((Route("GET", "/x", "x", "x", "x", SCHEDULER, "WatchRoutes"),))


def test_build_facade_names_missing_addresses() -> None:
    with pytest.raises(ValueError, match="quota_addr"):
        build_facade({"keys_addr": "a:1", "imagebuild_addr": "a:1", "scheduler_addr": "a:1"})


async def test_document_is_served_without_a_token(rig: Rig) -> None:
    reply = await rig.client.get("/openapi.json", user=None)
    assert reply.status == 200
    assert reply.body["servers"] == [{"url": "/api/v1"}]
    assert "/deployments/{name}:stop" in reply.body["paths"]


# --- translation ------------------------------------------------------------------------------


async def test_token_and_trace_context_reach_the_service(rig: Rig) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    reply = await rig.client.get("/deployments/web", headers={"traceparent": traceparent})
    assert reply.status == 200
    call = rig.stand_in.last("GetDeployment")
    assert call.method == "/shipyard.scheduler.v1.SchedulerService/GetDeployment"
    assert call.metadata["authorization"] == "Bearer ana-token"
    assert call.metadata["traceparent"] == traceparent
    assert call.request == sp.DeploymentRef(name="web")


async def test_create_deployment_body_becomes_the_request(rig: Rig) -> None:
    rig.stand_in.behaviour["CreateDeployment"] = _answer(
        sp.Deployment(name="web", group="team-a", status=sp.DEPLOYMENT_STATUS_DEPLOYING)
    )
    body = {
        "name": "web",
        "spec": {
            "image": "echo:1",
            "instance_type": "cpu.small",
            "scaling": {"min_replicas": 0, "max_replicas": 3},
            "access": "public",
            "metadata": {"team": "a"},
        },
        "readme": "# Web",
    }
    reply = await rig.client.post("/deployments", json=body)
    assert reply.status == 201, reply.body
    assert reply.headers["Location"] == "/api/v1/deployments/web"
    assert reply.body["status"] == "deploying"
    request = rig.stand_in.last("CreateDeployment").request
    assert isinstance(request, sp.CreateDeploymentRequest)
    assert request.name == "web" and request.readme == "# Web"
    assert request.spec.access == sp.ACCESS_PUBLIC
    assert request.spec.scaling.max_replicas == 3
    assert request.spec.HasField("scaling")
    assert dict(request.spec.metadata) == {"team": "a"}


async def test_path_parameters_win_and_bodies_nest(rig: Rig) -> None:
    c = rig.client
    assert (await c.patch("/deployments/web", json={"description": "x"})).status == 200
    update = rig.stand_in.last("UpdateDeployment").request
    assert isinstance(update, sp.UpdateDeploymentRequest)
    assert update.name == "web" and update.description == "x"
    assert not update.HasField("scaling")  # absent: unchanged

    assert (await c.post("/deployments/web:scale", json={"min_replicas": 2})).status == 200
    scale = rig.stand_in.last("ScaleDeployment").request
    assert scale == sp.ScaleDeploymentRequest(name="web", scaling=sp.Scaling(min_replicas=2))

    for verb, method in (("stop", "StopDeployment"), ("start", "StartDeployment")):
        assert (await c.post(f"/deployments/web:{verb}")).status == 200
        assert rig.stand_in.last(method).request == sp.DeploymentRef(name="web")

    body = {"cpu": 2.5, "memory_gib": 4, "instances": 3}
    assert (await c.put("/quotas/team-a", json=body, user="admin")).status == 200
    quota = rig.stand_in.last("SetGroupQuota").request
    assert quota == qp.SetGroupQuotaRequest(
        group="team-a", limits=qp.Resources(cpu=2.5, memory_gib=4, instances=3)
    )

    reply = await c.put("/instance-types/gpu.big", json={"cpu": 8, "gpu": 1}, user="admin")
    assert reply.status == 200
    itype = rig.stand_in.last("SetInstanceType").request
    assert itype == qp.SetInstanceTypeRequest(
        instance_type=qp.InstanceType(name="gpu.big", cpu=8, gpu=1)
    )

    assert (await c.get("/deployments", params={"status": "stopped", "mine": "true"})).status == 200
    listing = rig.stand_in.last("ListDeployments").request
    assert listing == sp.ListDeploymentsRequest(status=sp.DEPLOYMENT_STATUS_STOPPED, mine=True)


async def test_image_routes_build_name_and_version(rig: Rig) -> None:
    c = rig.client
    assert (await c.get("/images/echo")).status == 200
    assert rig.stand_in.last("GetImage").request == ib.GetImageRequest(image="echo")
    assert (await c.get("/images/echo", params={"version": "3", "group": "g"})).status == 200
    assert rig.stand_in.last("GetImage").request == ib.GetImageRequest(group="g", image="echo:3")
    assert (await c.get("/images/echo/2/usage")).status == 200
    assert rig.stand_in.last("GetImageUsage").request == ib.GetImageUsageRequest(image="echo:2")
    reply = await c.put("/images/echo/2/readme", json={"markdown": "# E"})
    assert reply.status == 200
    assert rig.stand_in.last("SetReadme").request == ib.SetReadmeRequest(
        image="echo:2", markdown="# E"
    )
    reply = await c.delete("/images/echo/2")
    assert reply.status == 204 and reply.body is None
    assert rig.stand_in.last("DeleteImage").request == ib.DeleteImageRequest(image="echo:2")


async def test_client_key_routes(rig: Rig) -> None:
    created = ck.CreatedClientKey(
        key=ck.ClientKey(deployment="web", group="team-a", client="shop", key_id="ck_1"),
        secret="s3cret",
    )
    rig.stand_in.behaviour["CreateClientKey"] = _answer(created)
    c = rig.client
    reply = await c.post("/deployments/web/keys", json={"client": "shop"})
    assert reply.status == 201
    assert reply.headers["Location"] == "/api/v1/deployments/web/keys/shop"
    assert reply.body["secret"] == "s3cret"
    assert reply.body["key"]["last_used_at"] is None  # unset timestamp
    assert rig.stand_in.last("CreateClientKey").request == ck.CreateClientKeyRequest(
        deployment="web", client="shop"
    )
    reply = await c.get("/deployments/web/keys", params={"include_revoked": "true"})
    assert reply.status == 200 and reply.body == {"keys": []}
    assert rig.stand_in.last("ListClientKeys").request == ck.ListClientKeysRequest(
        deployment="web", include_revoked=True
    )
    assert (await c.delete("/deployments/web/keys/shop")).status == 200
    assert rig.stand_in.last("RevokeClientKey").request == ck.RevokeClientKeyRequest(
        deployment="web", client="shop"
    )


async def test_upload_streams_the_body_to_start_build(rig: Rig) -> None:
    rig.stand_in.behaviour["StartBuild"] = _answer(
        ib.Build(build_id="b1", state=ib.BUILD_STATE_QUEUED)
    )
    tar = folder_tar({"serve.py": "x" * 3_000_000})  # more than one 1 MiB chunk... compressed
    tar += bytes(range(256)) * 8192  # ... so add 2 MiB that do not compress
    reply = await rig.client.post(
        "/builds",
        data=tar,
        params={"name": "echo", "python": "3.11", "skip_dependency_install": "1"},
        headers={"Content-Type": "application/gzip"},
    )
    assert reply.status == 202, reply.body
    assert reply.headers["Location"] == "/api/v1/builds/b1"
    assert reply.body["state"] == "queued"
    request = rig.stand_in.last("StartBuild").request
    assert isinstance(request, ib.StartBuildRequest)
    assert request.header.name == "echo"
    assert request.header.options == ib.BuildOptions(python="3.11", skip_dependency_install=True)
    assert rig.stand_in.uploads[-1] == tar


async def test_build_logs_are_collected(rig: Rig) -> None:
    rig.stand_in.streams["StreamBuildLogs"] = [
        ib.BuildLogLine(seq=i + 1, line=f"line {i}") for i in range(3)
    ]
    reply = await rig.client.get("/builds/b1/logs")
    assert reply.status == 200
    assert reply.body["build_id"] == "b1"
    assert [line["line"] for line in reply.body["lines"]] == ["line 0", "line 1", "line 2"]
    assert reply.body["lines"][0]["at"] is None
    request = rig.stand_in.last("StreamBuildLogs").request
    assert request == ib.StreamBuildLogsRequest(build_id="b1", follow=False)


async def test_response_json_shape(rig: Rig) -> None:
    at = Timestamp(seconds=1_700_000_000, nanos=5_000_000)
    rig.stand_in.behaviour["GetDeployment"] = _answer(
        sp.Deployment(
            name="web",
            status=sp.DEPLOYMENT_STATUS_DEPLOYED,
            access=sp.ACCESS_PRIVATE,
            image=sp.ImageRef(name="echo", version=1),
            metadata={"k": "v"},
            created_at=at,
        )
    )
    rig.stand_in.behaviour["GetImage"] = _answer(
        ib.Image(name="echo", size_bytes=5 * 2**40, packages=[ib.Package(name="numpy")])
    )
    body = (await rig.client.get("/deployments/web")).body
    assert body["status"] == "deployed" and body["access"] == "private"
    assert body["created_at"] == "2023-11-14T22:13:20.005Z"
    assert body["updated_at"] is None
    assert body["metadata"] == {"k": "v"}
    assert body["image"] == {
        "name": "echo",
        "version": 1,
        "digest": "",
        "kind": "",
        "reference": "",
    }
    assert body["scaling"] == {"min_replicas": 0, "max_replicas": 0, "target_inflight": 0}
    assert set(body) == {f.name for f in sp.Deployment.DESCRIPTOR.fields}
    image = (await rig.client.get("/images/echo")).body
    assert image["size_bytes"] == 5 * 2**40  # a number, not proto3 JSON's string
    assert image["packages"] == [{"name": "numpy", "version": ""}]


# --- the status table -------------------------------------------------------------------------

_LEAKY = (
    'Traceback (most recent call last):\n  File "/srv/app/queries.py", line 3\n'
    "asyncpg.exceptions.UndefinedTableError: SELECT * FROM scheduler.deployments"
)


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
async def test_status_table(rig: Rig, code: grpc.StatusCode) -> None:
    message = f"the service says {code.name}"
    if code not in HTTP_STATUS_FOR_GRPC or code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
    ):
        message += ": " + _LEAKY  # must not reach the caller
    rig.stand_in.behaviour["GetGroupUsage"] = _abort(code, message)
    reply = await rig.client.get("/quotas/team-a")
    expected = HTTP_STATUS_FOR_GRPC.get(code, 500)
    assert reply.status == expected
    error = reply.error
    if expected < 500:
        assert error == {"code": code.name, "message": message}
    else:
        for leak in ("Traceback", "/srv/app", "SELECT", "asyncpg", code.name.lower() + ":"):
            assert leak not in error["message"]
        assert error["code"] == (code.name if code in HTTP_STATUS_FOR_GRPC else "INTERNAL")
    if expected == 401:
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")


def test_status_table_choices() -> None:
    table = HTTP_STATUS_FOR_GRPC
    assert table[grpc.StatusCode.INVALID_ARGUMENT] == 400
    assert table[grpc.StatusCode.UNAUTHENTICATED] == 401
    assert table[grpc.StatusCode.PERMISSION_DENIED] == 403
    assert table[grpc.StatusCode.NOT_FOUND] == 404
    for conflict in ("ALREADY_EXISTS", "ABORTED", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"):
        assert table[grpc.StatusCode[conflict]] == 409
    assert table[grpc.StatusCode.UNAVAILABLE] == 503
    assert table[grpc.StatusCode.DEADLINE_EXCEEDED] == 504
    assert grpc.StatusCode.INTERNAL not in table


async def test_unreachable_service_is_503_without_its_address() -> None:
    nowhere = {
        f"{name}_addr": "127.0.0.1:1" for name in ("keys", "quota", "imagebuild", "scheduler")
    }
    async with (
        serve_facade(nowhere, call_timeout=5) as base_url,
        aiohttp.ClientSession() as session,
    ):
        reply = await RestClient(base_url, session, TOKENS).get("/deployments")
    assert reply.status == 503
    assert reply.error["code"] == "UNAVAILABLE"
    assert "127.0.0.1" not in reply.error["message"]
    assert "scheduler" in reply.error["message"]


async def test_slow_service_is_504(rig: Rig) -> None:
    never = asyncio.Event()

    async def hang(request: Message, context: Any) -> Message:
        await never.wait()
        raise AssertionError("unreachable")

    rig.stand_in.behaviour["ListInstanceTypes"] = hang
    try:
        reply = await rig.client.get("/instance-types")  # the rig's deadline is 2 s
    finally:
        never.set()
    assert reply.status == 504
    assert reply.error["code"] == "DEADLINE_EXCEEDED"


# --- refusals the facade makes itself ----------------------------------------------------------


async def test_every_operation_needs_a_token(rig: Rig) -> None:
    for route in ROUTES:
        if route.public:
            continue
        path = route.path.replace("{version}", "1").replace("{", "").replace("}", "")
        for auth in (None, "Basic YTpi", "Bearer", "Bearer tök"):
            headers = {"Authorization": auth} if auth else {}
            reply = await rig.client.call(route.method, path, user=None, headers=headers)
            assert reply.status == 401, (route.method, path, auth, reply.body)
            assert reply.error["code"] == "UNAUTHENTICATED"
            assert reply.headers["WWW-Authenticate"] == 'Bearer realm="shipyard"'
    assert rig.stand_in.calls == []


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b"{", "body", "not valid JSON"),
        (b"", "body", "is required"),
        (b"[1, 2]", "body", "must be an object"),
        (b'{"name": 7}', "name", "must be a string, got an integer"),
        (b'{"spec": {"scaling": {"min_replicas": "two"}}}', "spec.scaling.min_replicas", "integer"),
        (b'{"spec": {"scaling": {"min_replicas": 1.5}}}', "spec.scaling.min_replicas", "integer"),
        (b'{"spec": {"scaling": {"max_replicas": 3000000000}}}', "spec.scaling.max_replicas",
         "at most 2147483647"),
        (b'{"spec": {"access": "secret"}}', "spec.access", "one of 'private', 'public'"),
        (b'{"spec": {"access": "unspecified"}}', "spec.access", "one of"),
        (b'{"spec": {"imgae": "echo:1"}}', "spec.imgae", "not a known field"),
        (b'{"spec": {"metadata": {"k": 1}}}', "spec.metadata.k", "must be a string"),
        (b'{"spec": null}', "spec", "must be an object, got null"),
        (b'{"name": "\\ud800"}', "name", "not valid Unicode"),
        (b'{"name": NaN}', "body", "NaN is not a JSON value"),
        (b'{"name": "a"} trailing', "body", "not valid JSON"),
        (b"[" * 50_000, "body", "nested too deeply"),
        (b'{"name": ' + b"9" * 5000 + b"}", "body", "not valid JSON"),
        (b"\xff\xfe{}", "body", "not UTF-8"),
    ],
)  # fmt: skip
async def test_invalid_bodies_are_400_naming_the_field(
    rig: Rig, body: bytes, field: str, words: str
) -> None:
    reply = await rig.client.post("/deployments", data=body)
    assert reply.status == 400, reply.body
    assert reply.error["code"] == "INVALID_ARGUMENT"
    assert reply.error["field"] == field
    assert reply.error["message"].startswith(f"{field}: ")
    assert words in reply.error["message"]
    assert rig.stand_in.calls == []


@pytest.mark.parametrize(
    ("path", "field", "words"),
    [
        ("/deployments/web/instances?limit=ten", "limit", "must be an integer"),
        ("/deployments/web/instances?limit=-1&limit=2", "limit", "more than once"),
        ("/deployments/web/instances?limit=99999999999", "limit", "at most 2147483647"),
        ("/deployments?mine=maybe", "mine", "true or false"),
        ("/deployments?status=running", "status", "one of 'deploying'"),
        ("/images/echo/latest", "version", "must be an integer"),
        ("/images/echo/0/usage", "version", "at least 1"),
        ("/images/echo?version=x", "version", "must be an integer"),
    ],
)
async def test_invalid_parameters_are_400_naming_them(
    rig: Rig, path: str, field: str, words: str
) -> None:
    reply = await rig.client.get(path)
    assert reply.status == 400, reply.body
    assert reply.error["field"] == field
    assert words in reply.error["message"]


async def test_a_build_needs_a_name(rig: Rig) -> None:
    reply = await rig.client.post("/builds", data=b"x")
    assert reply.status == 400
    assert reply.error["message"] == "name: is required"


async def test_oversized_body_is_413(rig: Rig) -> None:
    big = json.dumps({"markdown": "x" * (65 * 1024)})
    reply = await rig.client.put("/deployments/web/readme", data=big)
    assert reply.status == 413
    assert reply.error["code"] == "PAYLOAD_TOO_LARGE"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"markdown": "'
        for _ in range(70):
            yield b"x" * 1024
        yield b'"}'

    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"{rig.base_url}/deployments/web/readme",
            data=chunks(),
            headers={"Authorization": "Bearer ana-token"},
        ) as resp,
    ):
        assert resp.status == 413


async def test_unknown_paths_and_methods_answer_in_the_error_shape(rig: Rig) -> None:
    reply = await rig.client.get("/deployment")
    assert reply.status == 404 and reply.error["code"] == "NOT_FOUND"
    reply = await rig.client.call("PUT", "/deployments")
    assert reply.status == 405 and reply.error["code"] == "METHOD_NOT_ALLOWED"
    assert set(reply.headers["Allow"].split(", ")) == {"GET", "POST"}
    reply = await rig.client.call("GET", "/deployments/web:stop")  # GET of the name "web:stop"
    assert reply.status == 200
    assert rig.stand_in.last("GetDeployment").request == sp.DeploymentRef(name="web:stop")
