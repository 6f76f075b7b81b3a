"""One real stack per test module: PostgreSQL, NATS, a real model server, a gateway (with
the async API mounted) routed to it by a stand-in scheduler, the asyncinference API in
this process (no workers), and its workers in a child process (``python -m
shipyard_asyncinference``) that tests may kill -9 and start again."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from shipyard.scheduler.v1 import scheduler_pb2 as spb
from shipyard.scheduler.v1 import scheduler_pb2_grpc
from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.domain import SingleRequest, lot
from shipyard_asyncinference.domain.lots import REQUEST_EVENT_OF
from shipyard_asyncinference.main import AsyncInference, build
from shipyard_asyncinference.settings import AsyncInferenceSettings
from shipyard_core.auth import InternalTokenAuthenticator, Principal
from shipyard_core.embedded import start_nats
from shipyard_core.embedded.postgres import PostgresProcess
from shipyard_gateway.async_api import AsyncApi
from shipyard_gateway.main import GatewayHost
from shipyard_gateway.main import build as build_gateway
from shipyard_gateway.settings import GatewaySettings
from shipyard_testing import StaticAuthenticator, wait_for

INTERNAL = "internal-secret"
TOKENS = {
    "ana-token": Principal("ana", False, frozenset({"team-a"})),
    "bob-token": Principal("bob", False, frozenset({"team-b"})),
    "root-token": Principal("root", True),
}
MAX_PAYLOAD = 256 * 1024
INLINE_MAX = 1024
START_TIMEOUT = 60.0

# Echoes its payload and the caller; {"fail": true} raises (500); {"wait_for": PATH}
# holds the call until PATH exists. Every call is logged to calls.log in the model dir.
SERVE = """\
import json
import os
import pathlib
import time


def load(model_dir):
    return pathlib.Path(model_dir)


def predict(model, payload, context):
    with open(model / "calls.log", "a") as log:
        log.write(json.dumps(payload.get("tag") if isinstance(payload, dict) else None) + "\\n")
    if isinstance(payload, dict) and payload.get("fail"):
        raise RuntimeError("this model always fails on this input")
    gate = payload.get("wait_for") if isinstance(payload, dict) else None
    if gate:
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
    return {"echo": payload, "user": context["headers"].get("x-forwarded-user", "")}
"""


def md(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a test token."""
    return (("authorization", f"Bearer {token}"),)


def auth(token: str) -> dict[str, str]:
    """HTTP headers for a test token."""
    return {"Authorization": f"Bearer {token}"}


# --- the model server ---------------------------------------------------------------------


@dataclass
class ModelServer:
    """One ``python -m shipyard_runtime serve`` child."""

    proc: subprocess.Popen[bytes]
    model_dir: Path
    log_path: Path
    address: str = ""

    def exchanges(self, path: str) -> int:
        """How many HTTP requests to ``path`` the server answered (its access log)."""
        return sum(f"POST {path} " in line for line in self.log_path.read_text().splitlines())

    def calls(self) -> list[Any]:
        """The ``tag`` of every payload the model was called with, in order."""
        import json

        path = self.model_dir / "calls.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


def _start_model_server(model_dir: Path, log_path: Path) -> ModelServer:
    with open(log_path, "wb") as log:
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
                "2",
                "--name",
                "echo",
                "--access-log",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    server = ModelServer(proc, model_dir, log_path)
    stdout = proc.stdout
    assert stdout is not None
    buffered = b""
    deadline = time.monotonic() + START_TIMEOUT
    while b"\n" not in buffered:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            raise AssertionError(f"model server did not start: {log_path.read_text()}")
        ready, _, _ = select.select([stdout], [], [], remaining)
        if ready:
            buffered += os.read(stdout.fileno(), 4096)
    server.address = buffered.decode().split(" on ", 1)[1].split()[0]
    return server


# --- the stand-in scheduler ---------------------------------------------------------------


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """``WatchRoutes`` sends :attr:`routes`, ``synced``, then what :meth:`push` queues.
    ``Activate`` of a deployment in :attr:`wake` pushes its woken route."""

    def __init__(self) -> None:
        self.routes: list[spb.RouteUpdate] = []
        self.wake: dict[str, spb.RouteUpdate] = {}
        self.activations: list[str] = []
        self.streams: list[asyncio.Queue[spb.RouteUpdate]] = []
        self.address = ""

    async def WatchRoutes(self, request: spb.WatchRoutesRequest, context: Any) -> Any:
        queue: asyncio.Queue[spb.RouteUpdate] = asyncio.Queue()
        self.streams.append(queue)
        for update in self.routes:
            yield update
        yield spb.RouteUpdate(synced=True)
        while True:
            yield await queue.get()

    def push(self, update: spb.RouteUpdate) -> None:
        """Sends ``update`` on every open stream."""
        for stream in self.streams:
            stream.put_nowait(update)

    async def Activate(self, request: spb.ActivateRequest, context: Any) -> spb.ActivateResponse:
        self.activations.append(request.deployment)
        woken = self.wake.pop(request.deployment, None)
        if woken is not None:
            self.push(woken)
        return spb.ActivateResponse(activated=woken is not None)


# --- the worker process -------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """Runs ``python -m shipyard_asyncinference`` (workers only matter) as a child."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        """Starts a new worker process."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shipyard_asyncinference"],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        self.started.append(self.proc)

    def kill9(self) -> None:
        """kill -9 of the current worker process."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Stops every worker process still running."""
        for proc in self.started:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@dataclass
class Stack:
    """What the tests use."""

    gateway: GatewayHost
    scheduler: FakeScheduler
    api: AsyncApi
    service: AsyncInference
    model: ModelServer
    worker: WorkerProcess
    http: aiohttp.ClientSession
    objects_dir: Path
    root: Path

    @property
    def batch_root(self) -> Path:
        """Where file:// batch inputs and outputs may be."""
        return self.root / "batch"

    @property
    def url(self) -> str:
        """The gateway's REST base URL."""
        return self.gateway.http_url

    def channel(self) -> grpc.aio.Channel:
        """A channel to the asyncinference API."""
        return grpc.aio.insecure_channel(self.service.host.address)

    async def submit(
        self, payload: Any, *, token: str = "ana-token", deployment: str = "echo"
    ) -> str:
        """Submits an async raw prediction as ``token``; returns its id."""
        async with self.http.post(
            f"{self.url}/deployments/{deployment}/predict",
            json=payload,
            headers={**auth(token), "X-Async-Request": "true"},
        ) as response:
            body = await response.json()
            assert response.status == 202, body
            assert response.headers["Location"] == (
                f"/deployments/{deployment}/async/{body['request_id']}"
            )
            return str(body["request_id"])

    async def status(
        self, request_id: str, *, token: str = "ana-token", deployment: str = "echo"
    ) -> dict[str, Any]:
        """The status document of a request."""
        async with self.http.get(
            f"{self.url}/deployments/{deployment}/async/{request_id}", headers=auth(token)
        ) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == 200, body
            return body

    async def wait_status(
        self, request_id: str, *statuses: str, within: float = 30.0, deployment: str = "echo"
    ) -> dict[str, Any]:
        """Waits until the request is in one of ``statuses``."""

        async def reached() -> dict[str, Any] | None:
            document = await self.status(request_id, deployment=deployment)
            return document if document["status"] in statuses else None

        return await wait_for(
            reached, timeout=within, interval=0.05, message=f"{request_id} to be {statuses}"
        )

    async def lot_of(self, request_id: str) -> str:
        """The lot a request belongs to (a request from before lots: itself)."""
        return (await self.service.commands.lots_of([request_id]))[request_id]

    async def wait_queued(self, request_id: str, deployment: str = "echo") -> None:
        """Waits until the queue message of the request's lot is in the ``ASYNC`` stream."""
        lot_id = await self.lot_of(request_id)
        js = self.service.service.js
        await wait_for(
            lambda: queue.is_queued(js, lot_id, deployment),
            timeout=10,
            message=f"the queue message of {request_id}",
        )

    async def event_types(self, request_id: str) -> list[str]:
        """The types of a request's changes, in order: the request events its lot's
        events stand for (``AsyncRequestStarted`` for its item of an ``AsyncLotStarted``)."""
        lot_id = await self.lot_of(request_id)
        found = lot(lot_id)
        stored = await self.service.service.store.read_stream(f"{found.aggregate_type}:{lot_id}")
        if isinstance(found, SingleRequest):
            return [event.event_type for event in stored]
        return [
            REQUEST_EVENT_OF[event.event_type]
            for event in stored
            for item in event.payload["requests"]
            if item["request_id"] == request_id
        ]


@pytest.fixture(scope="module")
async def stack(postgres_server: PostgresProcess, moto_endpoint: str) -> AsyncIterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="shipyard-async-"))
    database_url = postgres_server.create_database(f"t_{uuid.uuid4().hex[:20]}")
    nats = start_nats(root / "nats")
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "serve.py").write_text(SERVE)
    model = _start_model_server(model_dir, root / "model.log")
    scheduler = FakeScheduler()
    scheduler.routes = [
        spb.RouteUpdate(
            deployment="echo",
            group="team-a",
            access=spb.ACCESS_PRIVATE,
            revision=1,
            addresses=[model.address],
        ),
        spb.RouteUpdate(
            deployment="sleepy",
            group="team-a",
            access=spb.ACCESS_PRIVATE,
            revision=1,
            scaled_to_zero=True,
        ),
        spb.RouteUpdate(
            deployment="stopped",
            group="team-a",
            access=spb.ACCESS_PRIVATE,
            revision=1,
            stopped=True,
        ),
    ]
    scheduler.wake["sleepy"] = spb.RouteUpdate(
        deployment="sleepy",
        group="team-a",
        access=spb.ACCESS_PRIVATE,
        revision=1,
        addresses=[model.address],
    )
    sched_server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(scheduler, sched_server)
    scheduler.address = f"127.0.0.1:{sched_server.add_insecure_port('127.0.0.1:0')}"
    await sched_server.start()
    authenticator = InternalTokenAuthenticator(StaticAuthenticator(TOKENS), INTERNAL)
    gateway = await build_gateway(
        GatewaySettings(
            grpc_port=0,
            http_port=0,
            scheduler_addr=scheduler.address,
            keys_addr="127.0.0.1:1",
            nats_url=nats.url,
            internal_token=INTERNAL,
            data_dir=root,
            activation_timeout_seconds=5.0,
            upstream_timeout_seconds=30.0,
            shutdown_grace_seconds=2.0,
        ),
        authenticator,
    )
    assert gateway.metrics is not None
    api = gateway.async_api
    assert api is not None  # mounted by build(); its address is set once the service listens
    common: dict[str, Any] = {
        "database_url": database_url,
        "nats_url": nats.url,
        "data_dir": root,
        "internal_token": INTERNAL,
        "inline_max_bytes": INLINE_MAX,
        "max_payload_bytes": MAX_PAYLOAD,
        "ack_wait_seconds": 2.0,
        "retry_delay_seconds": 0.1,
        "max_attempts": 3,
        "sweep_interval_seconds": 3600.0,
        "batch_s3_buckets": "*",
    }
    worker: WorkerProcess | None = None
    try:
        async with gateway:
            await asyncio.wait_for(gateway.routes.wait_synced(), 10)
            service = await build(
                AsyncInferenceSettings(
                    grpc_port=0,
                    gateway_url=gateway.http_url,
                    worker_concurrency=0,
                    batch_concurrency=0,
                    **common,
                ),
                authenticator,
            )
            async with service.host:
                api.addr = service.host.address
                env = {
                    **os.environ,
                    **{f"SHIPYARD_{k.upper()}": str(v) for k, v in common.items()},
                    "SHIPYARD_GRPC_PORT": "0",
                    "SHIPYARD_GATEWAY_URL": gateway.http_url,
                    "SHIPYARD_WORKER_CONCURRENCY": "1",
                    "SHIPYARD_BATCH_CONCURRENCY": "2",
                    "SHIPYARD_LOG_JSON": "false",
                }
                worker = WorkerProcess(env, root / "worker.log")
                worker.start()
                async with aiohttp.ClientSession() as http:
                    yield Stack(
                        gateway,
                        scheduler,
                        api,
                        service,
                        model,
                        worker,
                        http,
                        root / "objects",
                        root,
                    )
    finally:
        if worker is not None:
            worker.stop()
        await sched_server.stop(0)
        model.proc.terminate()
        model.proc.wait(15)
        if model.proc.stdout is not None:
            model.proc.stdout.close()
        nats.stop()


def open_gate(path: Path) -> None:
    """Lets the model calls held on ``path`` go on."""
    path.touch()


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """A file path a held model call waits for (created at the end at the latest)."""
    path = tmp_path / "gate"
    yield path
    path.touch()
