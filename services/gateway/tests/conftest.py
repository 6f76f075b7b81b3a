"""Fixtures for the gateway's tests: real model servers, a stand-in scheduler, gateways.

- ``iris``: two real ``shipyard-runtime`` processes serving examples/iris (session scope:
  loading scikit-learn takes seconds), with access logs so tests can count what each one
  served.
- ``scheduler``: a stand-in ``SchedulerService`` (real grpc.aio server) whose
  ``WatchRoutes`` streams what the test pushes and whose ``Activate`` records its calls.
  The real scheduler is tested end to end in tests/.
- ``echo``: a real ``shipyard-runtime`` serving a tiny model folder written by the test
  (session scope) whose ``predict`` answers with the ``X-Forwarded-User`` it was given and
  can be held on a gate file (a slow model, for the concurrency limit).
- ``keys``: a stand-in ``ClientKeyService`` (real grpc.aio server) whose
  ``VerifyClientKey`` answers from a table the test fills, and flips to UNAUTHENTICATED
  when the test revokes a key.
- ``make_gateway``: builds and starts gateways (ports 0, the test's real NATS, the
  stand-in scheduler and keys service, a StaticAuthenticator), stopped after the test.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from shipyard.keys.v1 import client_keys_pb2 as kpb
from shipyard.keys.v1 import client_keys_pb2_grpc
from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard.scheduler.v1 import scheduler_pb2_grpc
from shipyard_core.auth import Principal
from shipyard_gateway.main import GatewayHost, build
from shipyard_gateway.settings import GatewaySettings
from shipyard_testing import StaticAuthenticator, wait_for

ROOT = Path(__file__).resolve().parents[3]
IRIS = ROOT / "examples" / "iris"
START_TIMEOUT = 90.0  # scikit-learn imports take seconds on a loaded machine
INTERNAL_TOKEN = "internal-secret"

TOKENS = {
    "ana-token": Principal("ana", False, frozenset({"team-a"})),
    "bob-token": Principal("bob", False, frozenset({"team-b"})),
    "root-token": Principal("root", True),
}


# --- model servers ------------------------------------------------------------------------


@dataclass
class ModelServer:
    """One ``python -m shipyard_runtime serve`` child process."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""

    def served(self) -> int:
        """How many ``POST /predict`` requests it answered (from its access log)."""
        return self.log_path.read_text(errors="replace").count("POST /predict ")


def _start_model_server(log_path: Path, model_dir: Path = IRIS, name: str = "") -> ModelServer:
    log = open(log_path, "wb")  # noqa: SIM115 - the child holds it; closed below
    # The local backend names the model after the deployment; a test that calls the OIP
    # or KServe routes of deployment D needs a server whose model is called D.
    naming = ["--name", name] if name else []
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shipyard_runtime",
                "serve",
                "--model-dir",
                str(model_dir),
                "--port",
                "0",
                "--workers",
                "1",
                "--access-log",
                *naming,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    finally:
        log.close()
    return ModelServer(proc, log_path)


def _read_ready_line(server: ModelServer, deadline: float) -> None:
    stdout = server.proc.stdout
    assert stdout is not None
    buffered = b""
    while b"\n" not in buffered:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or server.proc.poll() is not None:
            raise AssertionError(
                f"model server did not start: {server.log_path.read_text(errors='replace')}"
            )
        ready, _, _ = select.select([stdout], [], [], remaining)
        if ready:
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                continue
            buffered += chunk
    line = buffered.decode().strip()
    # "shipyard-runtime listening on 127.0.0.1:PORT workers=1"
    server.address = line.split(" on ", 1)[1].split()[0]


def _stop_model_servers(servers: list[ModelServer]) -> None:
    for server in servers:
        server.proc.terminate()
    for server in servers:
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
        if server.proc.stdout is not None:
            server.proc.stdout.close()


@pytest.fixture(scope="session")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ModelServer]]:
    """Two iris model servers (started in parallel) whose model is named ``iris``, stopped
    after the session."""
    folder = tmp_path_factory.mktemp("model-servers")
    servers = [_start_model_server(folder / f"iris-{i}.log", name="iris") for i in range(2)]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        for server in servers:
            _read_ready_line(server, deadline)
        yield servers
    finally:
        _stop_model_servers(servers)


ECHO_SERVE = """\
import os
import time


def load(model_dir):
    return None


def predict(model, payload, context):
    # {"wait_for": PATH} holds the request until the test creates PATH: a slow model
    # whose end the test decides (bounded, so a failed test cannot hang the server).
    gate = payload.get("wait_for") if isinstance(payload, dict) else None
    if gate:
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.002)
    return {
        "user": context["headers"].get("x-forwarded-user", ""),
        "protocol": context["protocol"],
    }
"""


@pytest.fixture(scope="session")
def echo_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """A model server whose model ``echo`` answers ``{"user": <X-Forwarded-User>,
    "protocol": ...}`` and waits for the file named by ``{"wait_for": path}``."""
    folder = tmp_path_factory.mktemp("echo-model")
    (folder / "serve.py").write_text(ECHO_SERVE)
    server = _start_model_server(folder.parent / "echo.log", folder, name="echo")
    try:
        _read_ready_line(server, time.monotonic() + START_TIMEOUT)
        yield server
    finally:
        _stop_model_servers([server])


def free_port_address() -> str:
    """``127.0.0.1:PORT`` where nothing listens (connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


# --- the stand-in scheduler ---------------------------------------------------------------


def route(
    name: str,
    *addresses: str,
    group: str = "team-a",
    public: bool = True,
    scaled_to_zero: bool = False,
    stopped: bool = False,
    revision: int = 1,
    max_inflight: int = 0,
) -> pb.RouteUpdate:
    """A RouteUpdate for one deployment."""
    return pb.RouteUpdate(
        deployment=name,
        group=group,
        access=pb.ACCESS_PUBLIC if public else pb.ACCESS_PRIVATE,
        revision=revision,
        addresses=list(addresses),
        scaled_to_zero=scaled_to_zero,
        stopped=stopped,
        max_inflight=max_inflight,
    )


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """``WatchRoutes`` sends ``snapshot``, waits for ``sync_gate``, sends ``synced``, then
    whatever :meth:`push` queues until :meth:`end_stream`. ``Activate`` records calls."""

    def __init__(self) -> None:
        self.snapshot: list[pb.RouteUpdate] = []
        self.sync_gate = asyncio.Event()
        self.sync_gate.set()
        self.streams: list[asyncio.Queue[pb.RouteUpdate | None]] = []
        self.authorizations: list[str] = []
        self.activations: list[str] = []
        self.address = ""

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: Any
    ) -> AsyncIterator[pb.RouteUpdate]:
        metadata = dict(context.invocation_metadata())
        self.authorizations.append(metadata.get("authorization", ""))
        queue: asyncio.Queue[pb.RouteUpdate | None] = asyncio.Queue()
        self.streams.append(queue)
        for update in list(self.snapshot):
            yield update
        await self.sync_gate.wait()
        yield pb.RouteUpdate(synced=True)
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item

    async def Activate(self, request: pb.ActivateRequest, context: Any) -> pb.ActivateResponse:
        self.activations.append(request.deployment)
        return pb.ActivateResponse(activated=True)

    def push(self, *updates: pb.RouteUpdate) -> None:
        """Sends ``updates`` on the current stream."""
        for update in updates:
            self.streams[-1].put_nowait(update)

    def end_stream(self) -> None:
        """Ends the current stream (the gateway reconnects)."""
        self.streams[-1].put_nowait(None)


@pytest.fixture
async def scheduler() -> AsyncIterator[FakeScheduler]:
    """A stand-in scheduler on a free port."""
    fake = FakeScheduler()
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.address = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await server.stop(0)


# --- the stand-in keys service ------------------------------------------------------------


@dataclass
class ClientKey:
    """One client key the stand-in knows."""

    deployment: str
    client: str
    key_id: str
    revoked: bool = False


class FakeKeys(client_keys_pb2_grpc.ClientKeyServiceServicer):
    """``VerifyClientKey`` from :attr:`keys` (secret → ClientKey), refusing revoked keys,
    keys of another deployment and a Basic client name that is not the key's, like the
    real service. Records every call; :attr:`gate`, when set, holds answers until it is
    set (to make callers overlap)."""

    def __init__(self) -> None:
        self.keys: dict[str, ClientKey] = {}
        self.calls: list[tuple[str, str]] = []
        self.authorizations: list[str] = []
        self.gate: asyncio.Event | None = None
        self.address = ""

    def add(self, secret: str, deployment: str, client: str) -> None:
        """Creates a key."""
        self.keys[secret] = ClientKey(deployment, client, f"ck_{client}")

    async def VerifyClientKey(
        self, request: kpb.VerifyClientKeyRequest, context: Any
    ) -> kpb.VerifiedClientKey:
        self.calls.append((request.deployment, request.client))
        self.authorizations.append(dict(context.invocation_metadata()).get("authorization", ""))
        if self.gate is not None:
            await self.gate.wait()
        key = self.keys.get(request.secret)
        if key is None or key.deployment != request.deployment:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown client key")
        assert key is not None
        if key.revoked:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "client key revoked")
        if request.client and request.client != key.client:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "the client name does not match the key"
            )
        return kpb.VerifiedClientKey(client=key.client, key_id=key.key_id)


@pytest.fixture
async def keys() -> AsyncIterator[FakeKeys]:
    """A stand-in keys service (ClientKeyService) on a free port."""
    fake = FakeKeys()
    server = grpc.aio.server()
    client_keys_pb2_grpc.add_ClientKeyServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.address = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await server.stop(0)


# --- gateways -----------------------------------------------------------------------------

MakeGateway = Callable[..., Awaitable[GatewayHost]]


@pytest.fixture
async def make_gateway(
    nats_url: str, scheduler: FakeScheduler, keys: FakeKeys, tmp_path: Path
) -> AsyncIterator[MakeGateway]:
    """``await make_gateway(**settings_overrides)``: a started gateway whose routing table
    is synced (``wait_synced=False`` skips that), stopped after the test."""
    hosts: list[GatewayHost] = []

    async def make(*, wait_synced: bool = True, **overrides: Any) -> GatewayHost:
        values: dict[str, Any] = {
            "grpc_port": 0,
            "http_port": 0,
            "scheduler_addr": scheduler.address,
            "keys_addr": keys.address,
            "nats_url": nats_url,
            "internal_token": INTERNAL_TOKEN,
            "data_dir": tmp_path,
            "load_report_interval_seconds": 0.2,
            "activation_timeout_seconds": 10.0,
            "upstream_timeout_seconds": 10.0,
            "shutdown_grace_seconds": 2.0,
        }
        values.update(overrides)
        host = await build(GatewaySettings(**values), StaticAuthenticator(TOKENS))
        await host.start()
        hosts.append(host)
        if wait_synced:
            await asyncio.wait_for(host.routes.wait_synced(), 10)
        return host

    try:
        yield make
    finally:
        for host in hosts:
            await host.stop()


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> GatewayHost:
    """A gateway with the default test settings."""
    return await make_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for calling the gateway."""
    async with aiohttp.ClientSession() as session:
        yield session


async def publish(scheduler: FakeScheduler, host: GatewayHost, *updates: pb.RouteUpdate) -> None:
    """Pushes ``updates`` and waits until the gateway's table shows the last of them."""
    scheduler.push(*updates)
    last = updates[-1]

    def applied() -> bool:
        current = host.routes.get(last.deployment)
        if last.removed:
            return current is None
        return (
            current is not None
            and current.addresses == tuple(last.addresses)
            and (current.stopped == last.stopped and current.scaled_to_zero == last.scaled_to_zero)
        )

    await wait_for(applied, message=f"route update for {last.deployment} applied")
