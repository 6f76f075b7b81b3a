"""Fixtures and helpers for the REST facade's tests (``test_facade*.py``).

- :func:`serve_facade`: the facade mounted at ``/api/v1`` on a bare aiohttp app (as the
  gateway mounts it), served on a free port.
- :class:`StandIn`: one grpc.aio server answering every method of the four services with
  an empty response (or what a test sets), recording each call: for the translation and
  the status table without databases.
- :func:`control_plane`: a real stack in this process (PostgreSQL, NATS, keys, quota,
  imagebuild, scheduler with the local backend) with real user tokens from keys, and the
  facade over it. Quota, imagebuild and scheduler resolve those tokens with a
  StaticAuthenticator (so they do not depend on keys at run time); keys checks its own.
- :class:`RestClient`: calls the facade and checks every JSON answer against the schema
  the OpenAPI document declares for that operation and status.

Test modules import the fixtures they use: ``from .facade_conftest import control_plane``.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jsonschema
import pytest
from aiohttp import web
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from multidict import CIMultiDictProxy

from shipyard.keys.v1 import identity_pb2 as idp
from shipyard.keys.v1 import identity_pb2_grpc
from shipyard.quota.v1 import quota_pb2 as qp
from shipyard.quota.v1 import quota_pb2_grpc
from shipyard_core.auth import InternalTokenAuthenticator, Principal
from shipyard_core.embedded import start_nats
from shipyard_core.embedded.postgres import PostgresProcess
from shipyard_core.grpckit.server import ServiceHost
from shipyard_gateway.facade import API_PREFIX, AddressesLike, FacadeAddresses, mount_facade
from shipyard_gateway.facade.routes import BACKENDS
from shipyard_testing import StaticAuthenticator, wait_for
from shipyard_testing.web import serve_app

INTERNAL = "internal-secret"

# The serving script of the images tests build: echoes its payload with the model's
# VERSION file. No requirements, so a build takes seconds.
SERVE = """\
import pathlib

def load(model_dir):
    return (pathlib.Path(model_dir) / "VERSION").read_text().strip()

def predict(model, payload):
    return {"version": model, "echo": payload}
"""


# --- serving the facade -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_facade(addresses: AddressesLike, **options: Any) -> AsyncIterator[str]:
    """Serves the facade at ``/api/v1`` of a bare app on a free port; yields the API's
    base URL (``http://127.0.0.1:PORT/api/v1``)."""
    root = web.Application()
    mount_facade(root, addresses, **options)
    async with serve_app(root, access_log=None) as port:
        yield f"http://127.0.0.1:{port}{API_PREFIX}"


# --- checking answers against the document -------------------------------------------------


class Conformance:
    """Finds the documented operation of a concrete request and validates JSON answers
    against the schema the document gives for their status."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document
        self._routes: list[tuple[re.Pattern[str], str, str]] = []
        for template, item in document["paths"].items():
            pattern = re.escape(template)
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+?)", pattern)
            for method in item:
                self._routes.append((re.compile(f"^{pattern}$"), method.upper(), template))

    def operation(self, method: str, path: str) -> Mapping[str, Any] | None:
        """The document's operation for ``method path`` (relative to the API base)."""
        for pattern, m, template in self._routes:
            if m == method.upper() and pattern.match(path):
                return dict(self.document["paths"][template][m.lower()])
        return None

    def _resolve(self, item: Mapping[str, Any]) -> Mapping[str, Any]:
        while "$ref" in item:
            node: Any = self.document
            for part in item["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            item = node
        return item

    def check(self, method: str, path: str, status: int, body: Any) -> None:
        """Asserts the answer is documented for the operation and matches its schema."""
        op = self.operation(method, path)
        if op is None:
            # Not an operation: the facade's own 404/405 answers, in the error shape.
            assert status in (404, 405), f"{method} {path} is undocumented but got {status}"
            schema: Mapping[str, Any] = {"$ref": "#/components/schemas/Error"}
        else:
            responses = op["responses"]
            response = responses.get(str(status)) or responses.get("default")
            assert response is not None, f"{method} {path}: status {status} is not documented"
            response = self._resolve(response)
            content = response.get("content")
            if content is None:
                assert body is None, f"{method} {path}: {status} documents no body"
                return
            schema = content["application/json"]["schema"]
        root = {**schema, "components": self.document["components"]}
        jsonschema.Draft202012Validator(root).validate(body)


# --- the client -----------------------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP answer."""

    status: int
    body: Any
    headers: CIMultiDictProxy[str]

    @property
    def error(self) -> Mapping[str, Any]:
        """The ``error`` object of an error answer."""
        assert isinstance(self.body, dict) and "error" in self.body, self.body
        error = self.body["error"]
        assert isinstance(error, dict)
        return error


class RestClient:
    """Calls the facade as a user; every JSON answer is checked against the document."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        tokens: Mapping[str, str],
        conformance: Conformance | None = None,
    ) -> None:
        self.base_url = base_url
        self.session = session
        self.tokens = dict(tokens)
        self.conformance = conformance

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = "ana",
        bearer: str | None = None,
        json: Any = None,
        data: bytes | str | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """``method path`` as ``user`` (a name in ``tokens``; None: no token) or with the
        raw ``bearer`` token."""
        all_headers = dict(headers or {})
        token = bearer if bearer is not None else (self.tokens[user] if user else None)
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(
            method,
            self.base_url + path,
            json=json,
            data=data,
            params=params,
            headers=all_headers,
        ) as resp:
            raw = await resp.read()
            body: Any = None
            if raw:
                assert resp.content_type == "application/json", (resp.content_type, raw[:200])
                body = await resp.json()
            reply = Reply(resp.status, body, resp.headers)
        if self.conformance is not None:
            self.conformance.check(method, path.split("?")[0], reply.status, reply.body)
        return reply

    async def get(self, path: str, **kwargs: Any) -> Reply:
        """``GET path``."""
        return await self.call("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Reply:
        """``POST path``."""
        return await self.call("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> Reply:
        """``PUT path``."""
        return await self.call("PUT", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> Reply:
        """``PATCH path``."""
        return await self.call("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Reply:
        """``DELETE path``."""
        return await self.call("DELETE", path, **kwargs)


# --- the stand-in services ------------------------------------------------------------------

Behaviour = Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]


@dataclass
class RecordedCall:
    """One call the stand-in received."""

    method: str
    request: Message
    metadata: dict[str, str]


_METHODS: dict[str, MethodDescriptor] = {
    f"/{b.service.full_name}/{m.name}": m for b in BACKENDS for m in b.service.methods
}


@dataclass
class StandIn(grpc.GenericRpcHandler):
    """Answers every method of keys, quota, imagebuild and scheduler: with
    ``behaviour[method name]`` when set, else an empty response (streams: the messages
    in ``streams[method name]``, none by default)."""

    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    calls: list[RecordedCall] = field(default_factory=list)
    uploads: list[bytes] = field(default_factory=list)
    """The ``chunk`` bytes of each client stream (StartBuild), joined."""
    streams: dict[str, list[Message]] = field(default_factory=dict)
    """What a server-streaming method (by name) sends."""

    def last(self, method: str) -> RecordedCall:
        """The latest call of ``method`` (a bare method name such as ``GetDeployment``)."""
        for call in reversed(self.calls):
            if call.method.endswith("/" + method):
                return call
        raise AssertionError(f"{method} was not called; calls: {[c.method for c in self.calls]}")

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        method = _METHODS.get(path)
        if method is None:
            return None
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        name = method.name

        async def answer(request: Message, context: grpc.aio.ServicerContext) -> Message:
            metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            self.calls.append(RecordedCall(path, request, metadata))
            behaviour = self.behaviour.get(name)
            if behaviour is not None:
                return await behaviour(request, context)
            return response_class()

        if method.client_streaming:

            async def collect(requests: AsyncIterator[Message], context: Any) -> Message:
                parts = [part async for part in requests]
                self.uploads.append(b"".join(getattr(p, "chunk", b"") for p in parts[1:]))
                first = parts[0] if parts else request_class()
                return await answer(first, context)

            return grpc.stream_unary_rpc_method_handler(
                collect,
                request_deserializer=request_class.FromString,
                response_serializer=response_class.SerializeToString,
            )
        if method.server_streaming:

            async def stream(request: Message, context: Any) -> AsyncIterator[Message]:
                await answer(request, context)
                for message in self.streams.get(name, []):
                    yield message

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=request_class.FromString,
                response_serializer=response_class.SerializeToString,
            )
        return grpc.unary_unary_rpc_method_handler(
            answer,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )


@contextlib.asynccontextmanager
async def stand_in_server() -> AsyncIterator[tuple[StandIn, FacadeAddresses]]:
    """A :class:`StandIn` on a free port; yields it and addresses pointing every
    service at it."""
    handler = StandIn()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        yield handler, FacadeAddresses(address, address, address, address, address)
    finally:
        await server.stop(None)


# --- the real control plane -----------------------------------------------------------------


@dataclass
class ControlPlane:
    """The running services, the facade's URL and the users' tokens."""

    base_url: str
    tokens: dict[str, str]
    """Real tokens from keys: ``admin`` (root), ``ana`` (team-a), ``bob`` (team-b)."""
    keys: ServiceHost
    quota: ServiceHost
    imagebuild: ServiceHost
    scheduler: ServiceHost
    document: dict[str, Any]

    def client(self, session: aiohttp.ClientSession) -> RestClient:
        """A client checking every answer against the document."""
        return RestClient(self.base_url, session, self.tokens, Conformance(self.document))


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _users(keys: ServiceHost, admin_token: str) -> dict[str, str]:
    """Creates groups team-a/team-b and users ana/bob; returns every user's token."""
    async with grpc.aio.insecure_channel(keys.address) as ch:
        stub = identity_pb2_grpc.IdentityServiceStub(ch)
        # The bootstrap token works once the projection has caught up with it.
        await wait_for(
            lambda: stub.WhoAmI(idp.WhoAmIRequest(), metadata=_md(admin_token)),
            timeout=30,
            interval=0.05,
            ignore=(grpc.aio.AioRpcError,),
            message="the bootstrap admin's token never worked",
        )
        tokens = {"admin": admin_token}
        for group, user in (("team-a", "ana"), ("team-b", "bob")):
            await stub.CreateGroup(idp.CreateGroupRequest(name=group), metadata=_md(admin_token))
            created = await stub.CreateUser(
                idp.CreateUserRequest(name=user, groups=[group]), metadata=_md(admin_token)
            )
            tokens[user] = created.token
        return tokens


@contextlib.asynccontextmanager
async def start_control_plane(postgres: PostgresProcess) -> AsyncIterator[ControlPlane]:
    """Starts the stack described in the module docstring; stops it afterwards."""
    # Imported here: a broken service package must fail the tests that need it only.
    from shipyard_imagebuild.main import build as build_imagebuild
    from shipyard_imagebuild.settings import ImageBuildSettings
    from shipyard_keys.main import bootstrap_admin
    from shipyard_keys.main import build as build_keys
    from shipyard_keys.settings import KeysSettings
    from shipyard_quota.main import build as build_quota
    from shipyard_quota.settings import QuotaSettings
    from shipyard_scheduler.main import build_scheduler
    from shipyard_scheduler.settings import SchedulerSettings

    root = Path(tempfile.mkdtemp(prefix="shipyard-facade-"))
    database_url = postgres.create_database(f"t_{uuid.uuid4().hex[:20]}")
    nats = start_nats(root / "nats")
    # Filled once keys has issued the tokens (keys needs the scheduler's address first).
    auth = StaticAuthenticator({})
    common: dict[str, Any] = {
        "database_url": database_url,
        "nats_url": nats.url,
        "grpc_port": 0,
        "data_dir": root,
        "log_json": False,
        "shutdown_grace_seconds": 2,
    }
    try:
        quota = await build_quota(QuotaSettings(**common), auth)
        imagebuild = await build_imagebuild(
            ImageBuildSettings(**common, uv_cache_dir=root / "uv-cache"), auth
        )
        async with quota, imagebuild:
            scheduler = await build_scheduler(
                SchedulerSettings(
                    **common,
                    quota_addr=quota.address,
                    imagebuild_addr=imagebuild.address,
                    internal_token=INTERNAL,
                    reconcile_interval_seconds=0.2,
                    restart_backoff_seconds=0.2,
                    max_restarts=2,
                    drain_seconds=0.5,
                    grace_seconds=3,
                ),
                InternalTokenAuthenticator(auth, INTERNAL),
            )
            try:
                async with scheduler.host:
                    keys_settings = KeysSettings(**common, scheduler_addr=scheduler.host.address)
                    keys = await build_keys(keys_settings)
                    async with keys:
                        outcome = await bootstrap_admin(keys_settings, "root")
                        assert outcome.token is not None
                        tokens = await _users(keys, outcome.token.token)
                        auth.tokens.update(
                            {
                                tokens["admin"]: Principal("root", True, frozenset()),
                                tokens["ana"]: Principal("ana", False, frozenset({"team-a"})),
                                tokens["bob"]: Principal("bob", False, frozenset({"team-b"})),
                            }
                        )
                        await _catalog(quota, tokens["admin"])
                        addresses = FacadeAddresses(
                            keys_addr=keys.address,
                            quota_addr=quota.address,
                            imagebuild_addr=imagebuild.address,
                            scheduler_addr=scheduler.host.address,
                        )
                        async with serve_facade(addresses) as base_url:
                            document = await _document(base_url)
                            yield ControlPlane(
                                base_url,
                                tokens,
                                keys,
                                quota,
                                imagebuild,
                                scheduler.host,
                                document,
                            )
            finally:
                shutdown = getattr(scheduler.backend, "shutdown_all", None)
                if shutdown is not None:
                    await shutdown()
    finally:
        nats.stop()


async def _document(base_url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base_url}/openapi.json") as resp,
    ):
        assert resp.status == 200
        document = await resp.json()
        assert isinstance(document, dict)
        return document


async def _catalog(quota: ServiceHost, admin_token: str) -> None:
    """Instance type cpu.small; team-a and team-b may run 2 instances each."""
    async with grpc.aio.insecure_channel(quota.address) as ch:
        stub = quota_pb2_grpc.QuotaServiceStub(ch)
        await stub.SetInstanceType(
            qp.SetInstanceTypeRequest(
                instance_type=qp.InstanceType(name="cpu.small", cpu=0.5, memory_gib=0.5)
            ),
            metadata=_md(admin_token),
        )
        for group in ("team-a", "team-b"):
            await stub.SetGroupQuota(
                qp.SetGroupQuotaRequest(
                    group=group, limits=qp.Resources(cpu=2, memory_gib=4, instances=2)
                ),
                metadata=_md(admin_token),
            )


@pytest.fixture(scope="module")
async def control_plane(postgres_server: PostgresProcess) -> AsyncIterator[ControlPlane]:
    """The real stack and the facade over it, once per test module."""
    async with start_control_plane(postgres_server) as plane:
        yield plane


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for one test."""
    async with aiohttp.ClientSession() as session:
        yield session
