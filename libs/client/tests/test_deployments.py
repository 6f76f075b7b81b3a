"""``client.deployments`` and ``shipyard deploy`` / ``shipyard predict`` against a
stand-in SchedulerService (grpc.aio, canned Deployment messages, every request recorded)
and a stand-in gateway (http.server). What is tested here is the client's own work: the
requests the flags turn into, the validation of flag combinations, the conversion to
dataclasses, waiting, and the output. The real scheduler is tested end to end elsewhere."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from shipyard.cli.deploy_cmds import curl_example
from shipyard.client import (
    Client,
    DeadlineExceeded,
    DeploymentFailed,
    DeploymentView,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
    predict,
)
from shipyard.client.config import ClientConfig
from shipyard.client.deployments import replica_range
from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

from .conftest import (
    assert_json_output,
    assert_one_line_error,
    assert_text_output,
    run,
    serving,
    shipyard,
    write_config,
)

TOKEN = "sy_admin_secret"
T0 = 1_700_000_000
FAILURE = "instance broken-r1-a exited: ModuleNotFoundError: No module named 'sklearn'"

# What GetDeployment answers, call after call, for a deployment that is rolling out:
# (status, ready replicas or None for "all", message).
ROLLOUT = [
    (pb.DEPLOYMENT_STATUS_DEPLOYING, 0, "starting 2 instances"),
    (pb.DEPLOYMENT_STATUS_DEPLOYING, 1, "1 of 2 instances ready"),
    (pb.DEPLOYMENT_STATUS_DEPLOYED, None, ""),
]
BROKEN = [
    (pb.DEPLOYMENT_STATUS_DEPLOYING, 0, "starting 1 instance"),
    (pb.DEPLOYMENT_STATUS_FAILED, 0, FAILURE),
]


def ts(offset: int = 0) -> Timestamp:
    return Timestamp(seconds=T0 + offset)


def _image_ref(image: str) -> pb.ImageRef:
    name, _, version = image.partition(":")
    return pb.ImageRef(
        name=name, version=int(version) if version else 3, digest="sha256:" + "cd34" * 16
    )


def _deployment(
    name: str,
    *,
    group: str = "team-a",
    image: str = "iris:1",
    status: Any = pb.DEPLOYMENT_STATUS_DEPLOYED,
    low: int = 2,
    high: int = 2,
    public: bool = False,
    created_by: str = "ana",
    message: str = "",
) -> pb.Deployment:
    ready = low if status == pb.DEPLOYMENT_STATUS_DEPLOYED else 0
    return pb.Deployment(
        name=name,
        group=group,
        revision=2,
        active_revision=2,
        image=_image_ref(image),
        instance_type="cpu.small",
        scaling=pb.Scaling(min_replicas=low, max_replicas=high, target_inflight=8),
        replicas=ready if status == pb.DEPLOYMENT_STATUS_DEPLOYED else 0,
        ready_replicas=ready,
        access=pb.ACCESS_PUBLIC if public else pb.ACCESS_PRIVATE,
        description=f"{name} for the shop",
        metadata={"team": "a", "owner": created_by},
        status=status,
        message=message,
        created_by=created_by,
        created_at=ts(),
        updated_by=created_by,
        updated_at=ts(60),
        endpoint=f"/deployments/{name}/predict",
    )


@dataclass
class FakeScheduler(pb_grpc.SchedulerServiceServicer):
    """Keeps deployments in a dict; records (method, request) of every call."""

    requests: list[tuple[str, Any]] = field(default_factory=list)
    deployments: dict[str, pb.Deployment] = field(default_factory=dict)
    plans: dict[str, list[tuple[Any, int | None, str]]] = field(default_factory=dict)
    hidden: dict[str, int] = field(default_factory=dict)  # GetDeployment says NOT_FOUND n times
    readmes: dict[str, pb.Readme] = field(default_factory=dict)
    clock: int = 100

    def reset(self) -> None:
        self.requests.clear()
        self.plans.clear()
        self.hidden.clear()
        self.deployments = {
            "iris-prod": _deployment("iris-prod", public=True),
            "iris-canary": _deployment(
                "iris-canary",
                image="iris:2",
                status=pb.DEPLOYMENT_STATUS_STOPPED,
                low=0,
                high=4,
                created_by="admin",
            ),
            "old": _deployment("old", group="team-b", status=pb.DEPLOYMENT_STATUS_DELETED),
        }
        self.readmes = {"iris-prod": pb.Readme(name="iris-prod", markdown="# Iris in production\n")}

    def sent(self, method: str) -> Any:
        """The last request of ``method``."""
        for name, request in reversed(self.requests):
            if name == method:
                return request
        raise AssertionError(f"{method} was not called; calls: {self.methods()}")

    def methods(self) -> list[str]:
        return [name for name, _ in self.requests]

    def _tick(self) -> Timestamp:
        self.clock += 1
        return ts(self.clock)

    async def _record(self, method: str, request: Any, context: Any) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() or ()}
        copy = type(request)()
        copy.CopyFrom(request)
        self.requests.append((method, copy))
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")

    async def _find(self, name: str, context: Any) -> pb.Deployment:
        found = self.deployments.get(name)
        if found is None or found.status == pb.DEPLOYMENT_STATUS_DELETED:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"deployment {name!r} does not exist; see `shipyard deploy list`",
            )
            raise AssertionError("unreachable")
        return found

    def _roll_out(self, d: pb.Deployment) -> None:
        d.status = pb.DEPLOYMENT_STATUS_DEPLOYING
        d.ready_replicas = 0
        d.message = ""
        d.updated_at.CopyFrom(self._tick())
        if d.image.name == "broken":
            self.plans[d.name] = list(BROKEN)
        elif d.image.name != "slow":
            self.plans[d.name] = list(ROLLOUT)

    async def CreateDeployment(self, request: Any, context: Any) -> pb.Deployment:
        await self._record("CreateDeployment", request, context)
        spec = request.spec
        if request.name in self.deployments:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"deployment {request.name!r} exists already"
            )
        if spec.instance_type == "gpu.huge":
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{request.name} needs 16 gpu; group team-a has 0 gpu free",
            )
        d = pb.Deployment(
            name=request.name,
            group=request.group or "team-a",
            revision=1,
            active_revision=1,
            image=_image_ref(spec.image),
            instance_type=spec.instance_type,
            scaling=spec.scaling,
            replicas=max(spec.scaling.min_replicas, 1),
            access=spec.access or pb.ACCESS_PRIVATE,
            description=spec.description,
            metadata=dict(spec.metadata),
            created_by="admin",
            created_at=self._tick(),
            updated_by="admin",
            endpoint=f"/deployments/{request.name}/predict",
        )
        self._roll_out(d)
        self.deployments[request.name] = d
        if request.readme:
            self.readmes[request.name] = pb.Readme(name=request.name, markdown=request.readme)
        if request.name.startswith("laggy"):
            self.hidden[request.name] = 2
        return d

    async def UpdateDeployment(self, request: Any, context: Any) -> pb.Deployment:
        await self._record("UpdateDeployment", request, context)
        d = await self._find(request.name, context)
        if request.image:
            d.image.CopyFrom(_image_ref(request.image))
        if request.instance_type:
            d.instance_type = request.instance_type
        if request.HasField("scaling"):
            d.scaling.CopyFrom(request.scaling)
        if request.access:
            d.access = request.access
        if request.set_description:
            d.description = request.description
        if request.clear_metadata:
            d.metadata.clear()
        d.metadata.update(request.metadata)
        d.revision += 1
        self._roll_out(d)
        return d

    async def ScaleDeployment(self, request: Any, context: Any) -> pb.Deployment:
        await self._record("ScaleDeployment", request, context)
        d = await self._find(request.name, context)
        d.scaling.CopyFrom(request.scaling)
        d.replicas = request.scaling.min_replicas
        d.updated_at.CopyFrom(self._tick())
        return d

    async def StopDeployment(self, request: Any, context: Any) -> pb.Deployment:
        await self._record("StopDeployment", request, context)
        d = await self._find(request.name, context)
        d.status = pb.DEPLOYMENT_STATUS_STOPPED
        d.replicas = d.ready_replicas = 0
        d.updated_at.CopyFrom(self._tick())
        return d

    async def StartDeployment(self, request: Any, context: Any) -> pb.Deployment:
        await self._record("StartDeployment", request, context)
        d = await self._find(request.name, context)
        if d.status != pb.DEPLOYMENT_STATUS_STOPPED:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"deployment {request.name!r} is deployed, not stopped",
            )
        d.replicas = max(d.scaling.min_replicas, 1)
        self._roll_out(d)
        return d

    async def DeleteDeployment(self, request: Any, context: Any) -> Any:
        await self._record("DeleteDeployment", request, context)
        d = await self._find(request.name, context)
        d.status = pb.DEPLOYMENT_STATUS_DELETED
        return pb.DeleteDeploymentResponse(name=request.name)

    async def GetDeployment(self, request: Any, context: Any) -> pb.Deployment:
        await self._record("GetDeployment", request, context)
        if self.hidden.get(request.name, 0) > 0:  # the read model has not caught up yet
            self.hidden[request.name] -= 1
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"deployment {request.name!r} does not exist"
            )
        d = await self._find(request.name, context)
        plan = self.plans.get(request.name)
        if plan:
            status, ready, message = plan.pop(0)
            d.status = status
            d.ready_replicas = d.replicas if ready is None else ready
            d.message = message
            d.updated_at.CopyFrom(self._tick())
        return d

    async def ListDeployments(self, request: Any, context: Any) -> Any:
        await self._record("ListDeployments", request, context)
        found = [
            d
            for d in self.deployments.values()
            if request.search.lower() in d.name.lower()
            and (not request.group or d.group == request.group)
            and (not request.status or d.status == request.status)
            and (not request.mine or d.created_by == "admin")
            and (
                request.include_deleted
                or request.status == pb.DEPLOYMENT_STATUS_DELETED
                or d.status != pb.DEPLOYMENT_STATUS_DELETED
            )
        ]
        return pb.ListDeploymentsResponse(deployments=found)

    async def GetHistory(self, request: Any, context: Any) -> pb.History:
        await self._record("GetHistory", request, context)
        await self._find(request.name, context)
        scaling = pb.Scaling(min_replicas=2, max_replicas=2)
        return pb.History(
            name=request.name,
            entries=[
                pb.HistoryEntry(
                    revision=2,
                    action="update",
                    actor="ana",
                    at=ts(60),
                    image=_image_ref("iris:2"),
                    scaling=scaling,
                    group="team-a",
                    instance_type="cpu.small",
                    message="retrained on the March data",
                    access=pb.ACCESS_PUBLIC,
                ),
                pb.HistoryEntry(
                    revision=1,
                    action="create",
                    actor="ana",
                    at=ts(),
                    image=_image_ref("iris:1"),
                    scaling=pb.Scaling(min_replicas=1, max_replicas=3),
                    group="team-a",
                    instance_type="cpu.small",
                    metadata={"team": "a"},
                    access=pb.ACCESS_PRIVATE,
                ),
            ],
        )

    async def ListInstances(self, request: Any, context: Any) -> Any:
        await self._record("ListInstances", request, context)
        await self._find(request.name, context)
        instances = [
            pb.Instance(
                instance_id=f"{request.name}-r2-b",
                deployment=request.name,
                revision=2,
                status=pb.INSTANCE_STATUS_READY,
                address="127.0.0.1:41001",
                created_at=ts(50),
                ready_at=ts(55),
                backend="local",
            ),
            pb.Instance(
                instance_id=f"{request.name}-r1-a",
                deployment=request.name,
                revision=1,
                status=pb.INSTANCE_STATUS_FAILED,
                restarts=3,
                message="exited with 1\nTraceback (most recent call last):\n  ValueError: bad",
                created_at=ts(),
                ended_at=ts(40),
                backend="local",
            ),
        ]
        return pb.ListInstancesResponse(instances=instances[: request.limit or 200])

    async def GetReadme(self, request: Any, context: Any) -> pb.Readme:
        await self._record("GetReadme", request, context)
        await self._find(request.name, context)
        return self.readmes.get(request.name, pb.Readme(name=request.name))

    async def SetReadme(self, request: Any, context: Any) -> pb.Readme:
        await self._record("SetReadme", request, context)
        await self._find(request.name, context)
        self.readmes[request.name] = pb.Readme(
            name=request.name, markdown=request.markdown, updated_by="admin", updated_at=ts(99)
        )
        return self.readmes[request.name]


# The stand-in gateway.


@dataclass
class Gateway:
    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)


class _GatewayHandler(BaseHTTPRequestHandler):
    gateway: Gateway

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _answer(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        auth = self.headers.get("Authorization")
        self.gateway.seen.append(
            {
                "path": self.path,
                "auth": auth,
                "content_type": self.headers.get("Content-Type"),
                "body": raw,
            }
        )
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "deployments" or parts[2] != "predict":
            self._answer(404, {"error": f"no route {self.path}"})
            return
        name = parts[1]
        if name == "iris-prod":
            payload = json.loads(raw)
            self._answer(200, {"predictions": ["setosa"] * len(payload["instances"])})
        elif name == "private":
            if auth != f"Bearer {TOKEN}":
                self._answer(401, {"error": "private deployment: send a key"})
            else:
                self._answer(200, {"ok": True})
        elif name == "plain":
            self._answer(200, b"just text", "text/plain; charset=utf-8")
        elif name == "crash":
            self._answer(500, {"error": {"message": "predict() raised KeyError: 'x'"}})
        elif name == "html":
            self._answer(502, b"<html>bad gateway</html>", "text/html")
        else:
            self._answer(404, {"error": f"deployment {name} not found"})


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    handler = type("Handler", (_GatewayHandler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    gw = Gateway(url=f"http://127.0.0.1:{server.server_address[1]}")
    handler.gateway = gw
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield gw
    finally:
        server.shutdown()
        server.server_close()


# Fixtures and helpers.


@dataclass
class Fake:
    servicer: FakeScheduler
    address: str
    home: Path
    gateway: Gateway


@pytest.fixture(scope="module")
async def scheduler_server() -> AsyncIterator[tuple[FakeScheduler, str]]:
    servicer = FakeScheduler()
    async with serving((pb_grpc.add_SchedulerServiceServicer_to_server, servicer)) as address:
        yield servicer, address


@pytest.fixture
def fake(scheduler_server: tuple[FakeScheduler, str], gateway: Gateway, tmp_path: Path) -> Fake:
    """The fake scheduler (reset) and gateway, and a home pointing the client at both."""
    servicer, address = scheduler_server
    servicer.reset()
    gateway.seen.clear()
    endpoints = {"scheduler": address, "gateway_http": gateway.url + "/"}
    home = write_config(tmp_path / "home", TOKEN, endpoints)
    return Fake(servicer, address, home, gateway)


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """wait() polls every few ms here instead of backing off to seconds."""
    monkeypatch.setattr("shipyard.client.deployments._FIRST_POLL", 0.01)
    monkeypatch.setattr("shipyard.client.deployments._MAX_POLL", 0.02)


# The client: requests and conversions.


async def test_create_sends_the_spec_and_converts_the_reply(fake: Fake) -> None:
    client = Client(home=fake.home)
    created = await run(
        client.deployments.create,
        "iris-new",
        "iris:1",
        group="team-a",
        instance_type="cpu.small",
        replicas=2,
        target_inflight=6,
        public=True,
        description="the shop's classifier",
        metadata={"team": "a", "cost-center": 42},
        readme="# Iris\n",
    )
    sent = fake.servicer.sent("CreateDeployment")
    assert sent.name == "iris-new" and sent.group == "team-a" and sent.readme == "# Iris\n"
    assert sent.spec.image == "iris:1" and sent.spec.instance_type == "cpu.small"
    assert (sent.spec.scaling.min_replicas, sent.spec.scaling.max_replicas) == (2, 2)
    assert sent.spec.scaling.target_inflight == 6
    assert sent.spec.access == pb.ACCESS_PUBLIC
    assert dict(sent.spec.metadata) == {"team": "a", "cost-center": "42"}
    assert isinstance(created, DeploymentView)
    assert created.status == "deploying"
    assert (created.image, created.min_replicas, created.max_replicas) == ("iris:1", 2, 2)
    assert created.public and created.access == "public" and created.fixed
    assert created.endpoint == "/deployments/iris-new/predict"
    assert created.created_at is not None and created.created_at.tzinfo is not None
    data = created.to_dict()
    assert data["status"] == "deploying" and data["metadata"]["cost-center"] == "42"
    json.dumps(data)
    client.close()


async def test_create_defaults_private_one_replica_and_ranges(fake: Fake) -> None:
    deployments = Client(home=fake.home).deployments
    await run(deployments.create, "one", "iris", instance_type="cpu.small")
    sent = fake.servicer.sent("CreateDeployment")
    assert sent.spec.access == pb.ACCESS_PRIVATE
    assert (sent.spec.scaling.min_replicas, sent.spec.scaling.max_replicas) == (1, 1)
    assert sent.group == ""  # the server picks the caller's only group
    await run(
        deployments.create, "ranged", "iris:2", instance_type="cpu.small", min_replicas=0,
        max_replicas=4,
    )  # fmt: skip
    sent = fake.servicer.sent("CreateDeployment")
    assert (sent.spec.scaling.min_replicas, sent.spec.scaling.max_replicas) == (0, 4)


def test_replica_range_rules() -> None:
    assert replica_range(3, None, None) == (3, 3)
    assert replica_range(None, 0, 5) == (0, 5)
    assert replica_range(None, None, None) is None
    with pytest.raises(InvalidArgument, match="exclude each other"):
        replica_range(2, 1, None)
    with pytest.raises(InvalidArgument, match="go together"):
        replica_range(None, 1, None)


async def test_local_validation_sends_nothing(fake: Fake) -> None:
    deployments = Client(home=fake.home).deployments
    with pytest.raises(InvalidArgument, match="exclude each other"):
        await run(
            deployments.create, "x", "iris:1", instance_type="cpu.small", replicas=2,
            max_replicas=3,
        )  # fmt: skip
    with pytest.raises(InvalidArgument, match="NAME:VERSION"):
        await run(deployments.create, "x", "iris:latest", instance_type="cpu.small")
    with pytest.raises(InvalidArgument, match="go together"):
        await run(deployments.scale, "iris-prod", min_replicas=1)
    with pytest.raises(InvalidArgument, match="status 'running'"):
        await run(deployments.list, status="running")
    assert fake.servicer.requests == []


async def test_update_sends_only_what_changes(fake: Fake) -> None:
    deployments = Client(home=fake.home).deployments
    await run(deployments.update, "iris-prod", image="iris:2", message="retrained")
    sent = fake.servicer.sent("UpdateDeployment")
    assert sent.image == "iris:2" and sent.message == "retrained"
    assert not sent.HasField("scaling")
    assert sent.access == pb.ACCESS_UNSPECIFIED
    assert sent.set_description is False and sent.clear_metadata is False
    assert sent.instance_type == "" and dict(sent.metadata) == {}
    assert "GetDeployment" not in fake.servicer.methods()

    await run(deployments.update, "iris-prod", public=False, description="", clear_metadata=True)
    sent = fake.servicer.sent("UpdateDeployment")
    assert sent.access == pb.ACCESS_PRIVATE
    assert sent.set_description is True and sent.description == ""
    assert sent.clear_metadata is True


async def test_changing_the_range_keeps_the_autoscaling_target(fake: Fake) -> None:
    deployments = Client(home=fake.home).deployments
    updated = await run(deployments.update, "iris-prod", replicas=3)
    sent = fake.servicer.sent("UpdateDeployment")
    assert (sent.scaling.min_replicas, sent.scaling.max_replicas) == (3, 3)
    assert sent.scaling.target_inflight == 8  # read from the deployment, not reset to 0
    assert updated.revision == 3
    scaled = await run(deployments.scale, "iris-prod", target_inflight=2)
    sent = fake.servicer.sent("ScaleDeployment")
    assert (sent.scaling.min_replicas, sent.scaling.max_replicas) == (3, 3)
    assert sent.scaling.target_inflight == 2
    assert scaled.target_inflight == 2


async def test_queries_convert(fake: Fake) -> None:
    deployments = Client(home=fake.home).deployments
    listed = await run(deployments.list)
    assert [d.name for d in listed] == ["iris-prod", "iris-canary"]
    assert [d.status for d in listed] == ["deployed", "stopped"]
    await run(deployments.list, search="IRIS", group="team-a", status="stopped", mine=True)
    sent = fake.servicer.sent("ListDeployments")
    assert (sent.search, sent.group, sent.mine) == ("IRIS", "team-a", True)
    assert sent.status == pb.DEPLOYMENT_STATUS_STOPPED
    everything = await run(deployments.list, include_deleted=True)
    assert "old" in [d.name for d in everything]

    history = await run(deployments.history, "iris-prod")
    assert [(h.revision, h.action, h.image) for h in history] == [
        (2, "update", "iris:2"),
        (1, "create", "iris:1"),
    ]
    assert history[0].access == "public" and history[1].max_replicas == 3

    instances = await run(deployments.instances, "iris-prod", limit=1)
    assert fake.servicer.sent("ListInstances").limit == 1
    assert [(i.instance_id, i.status, i.backend) for i in instances] == [
        ("iris-prod-r2-b", "ready", "local")
    ]
    assert (await run(deployments.readme, "iris-prod")) == "# Iris in production\n"
    saved = await run(deployments.set_readme, "iris-prod", "# New\n")
    assert saved.markdown == "# New\n" and saved.updated_by == "admin"
    with pytest.raises(NotFound, match="does not exist"):
        await run(deployments.get, "nope")


async def test_server_refusals_become_client_errors(fake: Fake) -> None:
    deployments = Client(home=fake.home).deployments
    with pytest.raises(QuotaExceeded, match="needs 16 gpu; group team-a has 0 gpu free"):
        await run(deployments.create, "big", "iris:1", instance_type="gpu.huge")
    with pytest.raises(FailedPrecondition, match="not stopped"):
        await run(deployments.start, "iris-prod")


# Waiting.


async def test_wait_follows_the_rollout(fake: Fake) -> None:
    deployments = Client(home=fake.home).deployments
    created = await run(deployments.create, "iris-new", "iris:1", instance_type="t", replicas=2)
    seen: list[tuple[str, int]] = []
    done = await run(
        deployments.wait,
        "iris-new",
        after=created,
        on_change=lambda d: seen.append((d.status, d.ready_replicas)),
    )
    assert done.status == "deployed" and done.ready_replicas == 2
    assert seen == [("deploying", 0), ("deploying", 1), ("deployed", 2)]


async def test_wait_raises_with_the_deployments_message_when_it_fails(fake: Fake) -> None:
    deployments = Client(home=fake.home).deployments
    created = await run(deployments.create, "broken", "broken:1", instance_type="t")
    with pytest.raises(DeploymentFailed) as info:
        await run(deployments.wait, "broken", after=created)
    assert info.value.deployment.status == "failed"
    assert str(info.value).startswith(f"deployment broken failed: {FAILURE}")
    assert "\n" not in str(info.value)
    # Waiting for "failed" itself is fine.
    await run(deployments.update, "broken", image="broken:2")
    assert (await run(deployments.wait, "broken", "failed")).message == FAILURE


async def test_wait_times_out_and_refuses_a_stopped_deployment(fake: Fake) -> None:
    deployments = Client(home=fake.home).deployments
    await run(deployments.create, "sloth", "slow:1", instance_type="t")
    with pytest.raises(DeadlineExceeded, match=r"sloth is still deploying, not deployed, after"):
        await run(deployments.wait, "sloth", timeout=0.2)
    with pytest.raises(FailedPrecondition, match="iris-canary is stopped") as info:
        await run(deployments.wait, "iris-canary")
    assert "shipyard deploy start iris-canary" in str(info.value)
    assert (await run(deployments.wait, "iris-canary", "stopped")).status == "stopped"


async def test_wait_after_a_command_rides_out_a_lagging_read_model(fake: Fake) -> None:
    deployments = Client(home=fake.home).deployments
    created = await run(deployments.create, "laggy", "iris:1", instance_type="t")
    done = await run(deployments.wait, "laggy", after=created)
    assert done.status == "deployed"
    assert fake.servicer.methods().count("GetDeployment") == 2 + len(ROLLOUT)
    # Without `after`, "not found" is the answer.
    await run(deployments.create, "laggy-2", "iris:1", instance_type="t")
    with pytest.raises(NotFound):
        await run(deployments.wait, "laggy-2")


# The CLI: flags to requests.


async def test_cli_create_sends_what_the_flags_say(fake: Fake, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Iris\n")
    result = await shipyard(
        fake.home,
        "deploy", "create", "iris-new",
        "--image", "iris:1",
        "--group", "team-a",
        "--instance-type", "cpu.small",
        "--replicas", "2",
        "--public",
        "--description", "shop classifier",
        "--meta", "a=1",
        "--meta", "b=2=x",
        "--readme", str(readme),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sent = fake.servicer.sent("CreateDeployment")
    assert (sent.spec.scaling.min_replicas, sent.spec.scaling.max_replicas) == (2, 2)
    assert dict(sent.spec.metadata) == {"a": "1", "b": "2=x"}
    assert sent.spec.access == pb.ACCESS_PUBLIC
    assert (sent.group, sent.readme, sent.spec.description) == (
        "team-a",
        "# Iris\n",
        "shop classifier",
    )
    assert result.stdout == (
        "created iris-new (deploying): iris:1 on cpu.small, 2 replicas, public\n"
    )
    assert "shipyard deploy show iris-new" in result.stderr

    await shipyard(
        fake.home, "deploy", "create", "ranged", "--image", "iris", "--instance-type", "t",
        "--min", "0", "--max", "4", "--target-inflight", "3",
    )  # fmt: skip
    sent = fake.servicer.sent("CreateDeployment")
    assert (sent.spec.scaling.min_replicas, sent.spec.scaling.max_replicas) == (0, 4)
    assert sent.spec.scaling.target_inflight == 3
    assert sent.spec.access == pb.ACCESS_PRIVATE


async def test_cli_update_scale_stop_start_delete(fake: Fake) -> None:
    updated = await shipyard(
        fake.home, "deploy", "update", "iris-prod", "--image", "iris:2", "--private",
        "--meta", "stage=prod", "--clear-meta", "-m", "retrained", "--description", "",
    )  # fmt: skip
    assert updated.exit_code == 0, updated.output
    assert updated.stdout == "updated iris-prod to revision 3 (deploying)\n"
    sent = fake.servicer.sent("UpdateDeployment")
    assert (sent.image, sent.message, sent.access) == ("iris:2", "retrained", pb.ACCESS_PRIVATE)
    assert dict(sent.metadata) == {"stage": "prod"} and sent.clear_metadata
    assert sent.set_description and not sent.HasField("scaling")

    public = await shipyard(fake.home, "deploy", "update", "iris-prod", "--public")
    assert public.exit_code == 0
    assert fake.servicer.sent("UpdateDeployment").access == pb.ACCESS_PUBLIC

    scaled = await shipyard(fake.home, "deploy", "scale", "iris-prod", "--min", "0", "--max", "5")
    assert scaled.stdout.startswith("scaled iris-prod to 0-5 replicas (autoscaled)")
    sent = fake.servicer.sent("ScaleDeployment").scaling
    assert (sent.min_replicas, sent.max_replicas, sent.target_inflight) == (0, 5, 8)

    stopped = await shipyard(fake.home, "deploy", "stop", "iris-prod", "--json")
    assert json.loads(stopped.stdout)["status"] == "stopped"
    started = await shipyard(fake.home, "deploy", "start", "iris-prod")
    assert started.stdout == "started iris-prod (deploying)\n"
    refused = await shipyard(fake.home, "deploy", "delete", "iris-prod", input="n\n")
    assert refused.exit_code == 1 and "DeleteDeployment" not in fake.servicer.methods()
    deleted = await shipyard(fake.home, "deploy", "delete", "iris-prod", "--yes")
    assert deleted.exit_code == 0
    assert deleted.stdout.startswith("deleted iris-prod")
    assert fake.servicer.sent("DeleteDeployment").name == "iris-prod"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["deploy", "create", "x", "--image", "i:1", "--instance-type", "t", "--replicas", "2",
          "--min", "1"], "--replicas and --min/--max exclude each other"),
        (["deploy", "create", "x", "--image", "i:1", "--instance-type", "t", "--min", "1"],
         "--min needs --max too"),
        (["deploy", "create", "x", "--image", "i:1", "--instance-type", "t", "--max", "3"],
         "--max needs --min too"),
        (["deploy", "create", "x", "--image", "i:1", "--instance-type", "t", "--meta", "nokey"],
         "expected KEY=VALUE, got 'nokey'"),
        (["deploy", "create", "x", "--image", "i:1", "--instance-type", "t", "--meta", "=v"],
         "expected KEY=VALUE"),
        (["deploy", "create", "x", "--instance-type", "t"], "--image"),
        (["deploy", "create", "x", "--image", "i:1", "--instance-type", "t", "--replicas", "-1"],
         "--replicas"),
        (["deploy", "update", "x"], "nothing to update"),
        (["deploy", "update", "x", "-m", "just a message"], "nothing to update"),
        (["deploy", "update", "x", "--replicas", "1", "--max", "2"], "exclude each other"),
        (["deploy", "scale", "x"], "give --replicas N, or --min N --max M"),
        (["deploy", "scale", "x", "--max", "2"], "--max needs --min too"),
        (["deploy", "list", "--status", "running"], "--status"),
        (["deploy", "delete", "x", "--json"], "--json needs --yes"),
        (["deploy", "instances", "x", "--limit", "500"], "--limit"),
        (["predict", "iris-prod", "--data", "{not json"], "--data is not valid JSON"),
        (["predict", "iris-prod", "--data", "@/nonexistent.json"], "cannot read"),
        (["predict", "iris-prod"], "--data"),
    ],
    ids=lambda a: " ".join(a[:3]) if isinstance(a, list) else None,
)  # fmt: skip
async def test_bad_flags_are_one_line_usage_errors(fake: Fake, args: list[str], says: str) -> None:
    line = assert_one_line_error(await shipyard(fake.home, *args), exit_code=2)
    assert says in line
    assert fake.servicer.requests == []
    assert fake.gateway.seen == []


# The CLI: output.


async def test_create_wait_shows_progress_on_stderr(fake: Fake) -> None:
    result = await shipyard(
        fake.home, "deploy", "create", "iris-new", "--image", "iris:1", "--instance-type", "t",
        "--replicas", "2", "--wait",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "created iris-new (deploying): iris:1 on t, 2 replicas, private",
        f"iris-new is deployed: 2/2 ready at {fake.gateway.url}/deployments/iris-new/predict",
    ]
    progress = result.stderr.splitlines()[1:]
    assert progress == [
        "iris-new: deploying, 0/2 ready (starting 2 instances)",
        "iris-new: deploying, 1/2 ready (1 of 2 instances ready)",
        "iris-new: deployed, 2/2 ready",
    ]
    as_json = await shipyard(
        fake.home, "deploy", "update", "iris-new", "--image", "iris:2", "--wait", "--json"
    )
    data = json.loads(as_json.stdout)
    assert (data["status"], data["image"], data["revision"]) == ("deployed", "iris:2", 2)
    assert "iris-new: deployed, 2/2 ready" in as_json.stderr


async def test_create_wait_fails_with_the_deployments_message(fake: Fake) -> None:
    result = await shipyard(
        fake.home, "deploy", "create", "broken", "--image", "broken:1", "--instance-type", "t",
        "--wait", "--json",
    )  # fmt: skip
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "failed"
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: deployment broken failed: {FAILURE}")
    assert "shipyard deploy instances broken" in last
    timeout = await shipyard(
        fake.home, "deploy", "create", "sloth", "--image", "slow:1", "--instance-type", "t",
        "--wait", "--timeout", "0.2",
    )  # fmt: skip
    assert timeout.exit_code == 1
    assert timeout.stderr.splitlines()[-1].startswith(
        "error: deployment sloth is still deploying, not deployed, after 0.2s"
    )


async def test_list_table(fake: Fake) -> None:
    listed = await shipyard(fake.home, "deploy", "list")
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == [
        "NAME", "GROUP", "STATUS", "IMAGE", "TYPE", "READY", "SCALE", "ACCESS", "UPDATED",
    ]  # fmt: skip
    assert rows[1][:8] == [
        "iris-prod", "team-a", "deployed", "iris:1", "cpu.small", "2/2", "2", "public",
    ]  # fmt: skip
    assert rows[2][:8] == [
        "iris-canary", "team-a", "stopped", "iris:2", "cpu.small", "0/0", "0-4", "private",
    ]  # fmt: skip
    # Aligned: every row's second column starts at the same offset.
    lines = listed.stdout.splitlines()
    assert len({line.index(row[1]) for line, row in zip(lines, rows, strict=True)}) == 1

    filtered = await shipyard(
        fake.home, "deploy", "list", "--search", "iris", "--group", "team-a", "--status",
        "STOPPED", "--mine", "--all",
    )  # fmt: skip
    sent = fake.servicer.sent("ListDeployments")
    assert (sent.search, sent.group, sent.mine, sent.include_deleted) == (
        "iris", "team-a", True, True,
    )  # fmt: skip
    assert sent.status == pb.DEPLOYMENT_STATUS_STOPPED
    assert [line.split()[0] for line in filtered.stdout.splitlines()] == ["NAME", "iris-canary"]
    none = await shipyard(fake.home, "deploy", "list", "--search", "zzz")
    assert none.stdout == "no deployments match\n"


async def test_show_prints_the_endpoint_and_a_curl_example(fake: Fake) -> None:
    public = await shipyard(fake.home, "deploy", "show", "iris-prod")
    assert public.exit_code == 0, public.output
    fields = dict(
        (line.split(":", 1)[0], line.split(":", 1)[1].strip())
        for line in public.stdout.splitlines()
        if line and not line.startswith(" ") and ":" in line and not line.startswith("predict")
    )
    url = f"{fake.gateway.url}/deployments/iris-prod/predict"
    assert fields["status"] == "deployed"
    assert fields["image"] == "iris:1 (sha256:cd34cd34cd34)"
    assert fields["replicas"] == "2/2 ready (fixed 2)"
    assert fields["endpoint"] == url
    assert fields["metadata"] == "owner=ana, team=a"
    assert f"  curl -X POST '{url}' \\" in public.stdout.splitlines()
    assert "Authorization" not in public.stdout
    assert "  shipyard predict iris-prod --data @payload.json" in public.stdout

    ref = "registry.example/team-a/iris@sha256:" + "ab" * 32
    fake.servicer.deployments["iris-canary"].image.kind = "oci"
    fake.servicer.deployments["iris-canary"].image.reference = ref
    private = await shipyard(fake.home, "deploy", "show", "iris-canary")
    assert '-H "Authorization: Bearer $SHIPYARD_TOKEN"' in private.stdout
    assert "(autoscaled 0-4, target 8 in flight)" in private.stdout
    # A cluster-built image shows the container image it runs.
    assert f"iris:2 (container image {ref})" in private.stdout
    data = json.loads((await shipyard(fake.home, "deploy", "show", "iris-prod", "--json")).stdout)
    assert data["url"] == url and data["status"] == "deployed" and data["access"] == "public"


def test_curl_example_is_one_shell_command() -> None:
    lines = curl_example("http://gw/deployments/d/predict", public=False)
    assert lines == [
        "curl -X POST 'http://gw/deployments/d/predict' \\",
        "  -H 'Content-Type: application/json' \\",
        '  -H "Authorization: Bearer $SHIPYARD_TOKEN" \\',
        "  -d @payload.json",
    ]


async def test_history_instances_readme_text(fake: Fake, tmp_path: Path) -> None:
    history = await shipyard(fake.home, "deploy", "history", "iris-prod")
    rows = [line.split() for line in history.stdout.splitlines()]
    assert rows[0] == ["REV", "ACTION", "BY", "AT", "IMAGE", "TYPE", "SCALE", "ACCESS", "MESSAGE"]
    assert rows[1][:3] == ["2", "update", "ana"] and rows[1][-5:] == [
        "retrained", "on", "the", "March", "data",
    ]  # fmt: skip
    assert "1-3" in rows[2]

    instances = await shipyard(fake.home, "deploy", "instances", "iris-prod", "--limit", "5")
    assert fake.servicer.sent("ListInstances").limit == 5
    lines = instances.stdout.splitlines()
    assert lines[0].split()[:3] == ["INSTANCE", "REV", "STATUS"]
    assert "127.0.0.1:41001" in lines[1]
    assert "exited with 1 Traceback (most recent call last):" in lines[2]  # one line per row
    assert len(lines) == 3

    assert (await shipyard(fake.home, "deploy", "readme", "iris-prod")).stdout == (
        "# Iris in production\n"
    )
    source = tmp_path / "README.md"
    source.write_text("# Updated\n")
    saved = await shipyard(fake.home, "deploy", "readme", "iris-prod", "--set", str(source))
    assert saved.stdout == "readme of iris-prod saved (10 bytes)\n"
    assert fake.servicer.sent("SetReadme").markdown == "# Updated\n"
    empty = await shipyard(fake.home, "deploy", "readme", "iris-canary")
    assert empty.stdout == "" and "has no readme" in empty.stderr


JSON_COMMANDS = [
    ["deploy", "list"],
    ["deploy", "show", "iris-prod"],
    ["deploy", "history", "iris-prod"],
    ["deploy", "instances", "iris-prod"],
    ["deploy", "readme", "iris-prod"],
    ["deploy", "create", "json-new", "--image", "iris:1", "--instance-type", "t"],
    ["deploy", "update", "iris-prod", "--replicas", "3"],
    ["deploy", "scale", "iris-prod", "--replicas", "1"],
    ["deploy", "stop", "iris-prod"],
    ["deploy", "start", "iris-canary"],
    ["deploy", "delete", "iris-prod", "--yes"],
    ["predict", "iris-prod", "--data", '{"instances": [[1, 2, 3, 4]]}'],
]


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=lambda a: " ".join(a[:2]))
async def test_json_output_is_valid_json(fake: Fake, args: list[str]) -> None:
    await assert_json_output(fake.home, *args)


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=lambda a: " ".join(a[:2]))
async def test_text_output_works(fake: Fake, args: list[str]) -> None:
    await assert_text_output(fake.home, *args)


async def test_not_found_is_one_line(fake: Fake) -> None:
    for verb in ("show", "stop", "history", "instances", "readme"):
        line = assert_one_line_error(await shipyard(fake.home, "deploy", verb, "nope"))
        assert line == "error: deployment 'nope' does not exist; see `shipyard deploy list`"


async def test_unreachable_scheduler_is_one_line(tmp_path: Path, unused_port: int) -> None:
    write_config(tmp_path, TOKEN, {"scheduler": f"127.0.0.1:{unused_port}"})
    line = assert_one_line_error(await shipyard(tmp_path, "deploy", "list"))
    assert f"cannot reach the scheduler service at 127.0.0.1:{unused_port}" in line


async def test_help_lists_the_deploy_commands(fake: Fake) -> None:
    result = await shipyard(fake.home, "deploy", "--help")
    verbs = ("create", "update", "stop", "start", "scale", "delete", "list", "show", "history")
    for verb in (*verbs, "instances", "readme"):
        assert verb in result.stdout
    top = await shipyard(fake.home, "--help")
    assert "deploy" in top.stdout and "predict" in top.stdout


# Predictions through the gateway.


def test_gateway_url_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ClientConfig().gateway_url() == "http://127.0.0.1:8080"
    config = ClientConfig(endpoints={"gateway_http": "gw.internal:9000/"})
    assert config.gateway_url() == "http://gw.internal:9000"
    monkeypatch.setenv("SHIPYARD_GATEWAY_URL", "https://models.example.com/")
    assert config.gateway_url() == "https://models.example.com"


async def test_predict_posts_json_with_the_token(fake: Fake) -> None:
    client = Client(home=fake.home)
    answer = await run(client.deployments.predict, "iris-prod", {"instances": [[1, 2], [3, 4]]})
    assert answer == {"predictions": ["setosa", "setosa"]}
    seen = fake.gateway.seen[-1]
    assert seen["path"] == "/deployments/iris-prod/predict"
    assert seen["auth"] == f"Bearer {TOKEN}"
    assert seen["content_type"] == "application/json"
    assert json.loads(seen["body"]) == {"instances": [[1, 2], [3, 4]]}
    # An explicit key wins; "" sends none.
    await run(client.deployments.predict, "iris-prod", {"instances": []}, token="sk_key")
    assert fake.gateway.seen[-1]["auth"] == "Bearer sk_key"
    await run(client.deployments.predict, "iris-prod", {"instances": []}, token="")
    assert fake.gateway.seen[-1]["auth"] is None
    assert await run(client.deployments.predict, "plain", {}) == "just text"


async def test_predict_errors_carry_the_gateways_message(fake: Fake, unused_port: int) -> None:
    deployments = Client(home=fake.home).deployments
    with pytest.raises(NotFound) as missing:
        await run(deployments.predict, "nope", {})
    assert str(missing.value) == "deployment nope not found"
    assert missing.value.service == "gateway"
    with pytest.raises(Unauthenticated, match="private deployment: send a key") as anon:
        await run(deployments.predict, "private", {}, token="")
    assert "is private" in str(anon.value)
    with pytest.raises(Exception, match=r"predict\(\) raised KeyError") as crash:
        await run(deployments.predict, "crash", {})
    assert crash.value.__class__.__name__ == "ServerError"
    with pytest.raises(Unavailable, match="the gateway answered HTTP 502"):
        await run(deployments.predict, "html", {})
    dead = f"http://127.0.0.1:{unused_port}"
    with pytest.raises(Unavailable, match=f"cannot reach the gateway at {dead}"):
        await run(deployments.predict, "iris-prod", {}, gateway_url=dead)


def test_module_level_predict_reads_the_environment(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHIPYARD_HOME", str(tmp_path))
    monkeypatch.setenv("SHIPYARD_GATEWAY_URL", gateway.url)
    monkeypatch.setenv("SHIPYARD_TOKEN", TOKEN)
    assert predict("private", {"x": 1}) == {"ok": True}
    assert gateway.seen[-1]["auth"] == f"Bearer {TOKEN}"


async def test_cli_predict(fake: Fake, tmp_path: Path) -> None:
    payload = tmp_path / "payload.json"
    payload.write_text('{"instances": [[5.1, 3.5, 1.4, 0.2]]}')
    result = await shipyard(fake.home, "predict", "iris-prod", "--data", f"@{payload}")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"predictions": ["setosa"]}
    assert fake.gateway.seen[-1]["auth"] == f"Bearer {TOKEN}"
    piped = await shipyard(
        fake.home, "predict", "iris-prod", "-d", "@-", input='{"instances": [[1], [2]]}'
    )
    assert json.loads(piped.stdout) == {"predictions": ["setosa", "setosa"]}
    keyed = await shipyard(
        fake.home, "--token", "sk_client_key", "predict", "private", "--data", "{}"
    )
    assert keyed.exit_code == 1 and fake.gateway.seen[-1]["auth"] == "Bearer sk_client_key"


async def test_cli_predict_error_is_one_line(fake: Fake) -> None:
    line = assert_one_line_error(await shipyard(fake.home, "predict", "nope", "--data", "{}"))
    assert line == "error: deployment nope not found"
    line = assert_one_line_error(
        await shipyard(fake.home, "predict", "crash", "--data", "[1]", "--json")
    )
    assert line == "error: predict() raised KeyError: 'x'"


async def test_cli_predict_gateway_from_env_and_flag(
    fake: Fake, gateway: Gateway, tmp_path: Path, unused_port: int
) -> None:
    home = write_config(tmp_path / "bare", TOKEN)
    # Default: 127.0.0.1:8080 (unlikely to be our stand-in); the flag and env win.
    via_env = await shipyard(
        home, "predict", "iris-prod", "--data", '{"instances": [1]}',
        env={"SHIPYARD_GATEWAY_URL": gateway.url},
    )  # fmt: skip
    assert json.loads(via_env.stdout) == {"predictions": ["setosa"]}
    via_flag = await shipyard(
        home, "predict", "iris-prod", "--data", '{"instances": [1]}', "--gateway", gateway.url
    )
    assert via_flag.exit_code == 0
    dead = f"http://127.0.0.1:{unused_port}"
    line = assert_one_line_error(
        await shipyard(home, "predict", "iris-prod", "--data", "{}", "--gateway", dead)
    )
    assert line.startswith(f"error: cannot reach the gateway at {dead}")
