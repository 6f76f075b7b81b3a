"""A real in-process grpc.aio server with small fake servicers, to test the client's own
work: status codes to exceptions, the token in metadata, protobuf to dataclasses, and the
CLI's output. The services' behaviour is tested end to end elsewhere.

Also the helpers every test module shares (import them with ``from .conftest import``):
a grpc.aio server for a module's own fake servicer, a home's ``config.json``, calling the
client and the CLI off the event loop, and the checks of the CLI's output."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result
from google.protobuf.timestamp_pb2 import Timestamp

from shipyard.cli.main import cli
from shipyard.client.events import EVENT_SOURCED_SERVICES
from shipyard.common.v1 import events_pb2 as ev_pb
from shipyard.common.v1 import events_pb2_grpc as ev_grpc
from shipyard.keys.v1 import identity_pb2 as id_pb
from shipyard.keys.v1 import identity_pb2_grpc as id_grpc
from shipyard.quota.v1 import quota_pb2 as q_pb
from shipyard.quota.v1 import quota_pb2_grpc as q_grpc

ADMIN_TOKEN = "sy_admin_secret"
USER_TOKEN = "sy_ana_secret"
TOKENS = {ADMIN_TOKEN: ("admin", True, ["ops"]), USER_TOKEN: ("ana", False, ["team-a"])}
RECORDED = Timestamp(seconds=1_700_000_000)


@dataclass
class Calls:
    """What the fake servers saw: method name and metadata of each call."""

    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def last(self, method: str) -> dict[str, str]:
        for name, metadata in reversed(self.seen):
            if name == method:
                return metadata
        raise AssertionError(f"{method} was not called")


async def _principal(
    calls: Calls, method: str, context: grpc.aio.ServicerContext
) -> tuple[str, bool, list[str]]:
    """Records the call and resolves the bearer token like the real interceptor would."""
    metadata = {k: v for k, v in context.invocation_metadata() or ()}
    calls.seen.append((method, metadata))
    header = metadata.get("authorization", "")
    if not header:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token in the call")
    token = header.removeprefix("Bearer ")
    if token not in TOKENS:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
    return TOKENS[token]


async def _admin(calls: Calls, method: str, context: grpc.aio.ServicerContext) -> None:
    _, admin, _ = await _principal(calls, method, context)
    if not admin:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, f"{method} is for admins; ask an admin"
        )


def _res(cpu: float, mem: float, gpu: int, inst: int) -> q_pb.Resources:
    return q_pb.Resources(cpu=cpu, memory_gib=mem, gpu=gpu, instances=inst)


class FakeQuota(q_grpc.QuotaServiceServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls
        self.types: dict[str, q_pb.InstanceType] = {
            "cpu.small": q_pb.InstanceType(
                name="cpu.small", cpu=1, memory_gib=2, gpu=0, description="small"
            )
        }

    async def SetInstanceType(self, request: Any, context: Any) -> q_pb.InstanceType:
        await _admin(self.calls, "SetInstanceType", context)
        self.types[request.instance_type.name] = request.instance_type
        return request.instance_type

    async def ListInstanceTypes(self, request: Any, context: Any) -> Any:
        await _principal(self.calls, "ListInstanceTypes", context)
        return q_pb.ListInstanceTypesResponse(instance_types=list(self.types.values()))

    async def SetGroupQuota(self, request: Any, context: Any) -> q_pb.GroupUsage:
        await _admin(self.calls, "SetGroupQuota", context)
        if request.group == "nope":
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                "group nope does not exist (create it with `shipyard groups create nope`)",
            )
        return q_pb.GroupUsage(
            group=request.group,
            limits=request.limits,
            used=_res(0, 0, 0, 0),
            free=request.limits,
            updated_at=RECORDED,
        )

    async def GetGroupUsage(self, request: Any, context: Any) -> q_pb.GroupUsage:
        await _principal(self.calls, "GetGroupUsage", context)
        if request.group.startswith("fail-"):
            # "fail-RESOURCE_EXHAUSTED" aborts with that status: a table-driven test hook.
            code = grpc.StatusCode[request.group.removeprefix("fail-")]
            await context.abort(code, f"server says {code.name} for {request.group}")
        return _usage(request.group)

    async def ListGroupUsage(self, request: Any, context: Any) -> Any:
        await _principal(self.calls, "ListGroupUsage", context)
        return q_pb.ListGroupUsageResponse(groups=[_usage("team-a"), _usage("team-b")])

    async def Reserve(self, request: Any, context: Any) -> q_pb.Reservation:
        await _principal(self.calls, "Reserve", context)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{request.deployment} needs 8 cpu; group {request.group} has 3 cpu free",
        )
        raise AssertionError("unreachable")

    async def Release(self, request: Any, context: Any) -> q_pb.ReleaseResponse:
        await _principal(self.calls, "Release", context)
        return q_pb.ReleaseResponse(released=request.reservation_id == "r-1")


def _usage(group: str) -> q_pb.GroupUsage:
    return q_pb.GroupUsage(
        group=group,
        limits=_res(4, 8, 1, 4),
        used=_res(1, 2, 0, 1),
        free=_res(3, 6, 1, 3),
        reservations=[
            q_pb.Reservation(
                reservation_id="r-1",
                group=group,
                deployment="iris-prod",
                instance_type="cpu.small",
                instances=1,
                resources=_res(1, 2, 0, 1),
                reserved_at=RECORDED,
            )
        ],
        updated_at=RECORDED,
    )


class FakeIdentity(id_grpc.IdentityServiceServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls
        self.users: dict[str, id_pb.User] = {}
        self.groups: dict[str, id_pb.Group] = {
            "team-a": id_pb.Group(name="team-a", description="A", members=["ana"])
        }

    async def CreateUser(self, request: Any, context: Any) -> id_pb.CreateUserResponse:
        await _admin(self.calls, "CreateUser", context)
        if request.name in self.users:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"user {request.name} exists already"
            )
        for group in request.groups:
            if group not in self.groups:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"groups: group {group} does not exist (create it first)",
                )
        user = id_pb.User(
            name=request.name,
            admin=request.admin,
            groups=list(request.groups),
            created_at=RECORDED,
            created_by="admin",
        )
        self.users[request.name] = user
        return id_pb.CreateUserResponse(
            user=user, token=f"sy_{request.name}_onceonly", token_id="tok-1"
        )

    async def ListUsers(self, request: Any, context: Any) -> id_pb.ListUsersResponse:
        await _admin(self.calls, "ListUsers", context)
        return id_pb.ListUsersResponse(users=list(self.users.values()))

    async def IssueToken(self, request: Any, context: Any) -> id_pb.IssueTokenResponse:
        await _principal(self.calls, "IssueToken", context)
        return id_pb.IssueTokenResponse(token=f"sy_{request.user}_second", token_id="tok-2")

    async def RevokeToken(self, request: Any, context: Any) -> id_pb.RevokeTokenResponse:
        await _principal(self.calls, "RevokeToken", context)
        if request.token_id != "tok-1":
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"token {request.token_id} of user {request.user} not found",
            )
        return id_pb.RevokeTokenResponse()

    async def CreateGroup(self, request: Any, context: Any) -> id_pb.Group:
        await _admin(self.calls, "CreateGroup", context)
        group = id_pb.Group(name=request.name, description=request.description, created_at=RECORDED)
        self.groups[request.name] = group
        return group

    async def AddMember(self, request: Any, context: Any) -> id_pb.Group:
        await _admin(self.calls, "AddMember", context)
        group = self.groups[request.group]
        group.members.append(request.user)
        return group

    async def RemoveMember(self, request: Any, context: Any) -> id_pb.Group:
        await _admin(self.calls, "RemoveMember", context)
        group = self.groups[request.group]
        group.members.remove(request.user)
        return group

    async def ListGroups(self, request: Any, context: Any) -> id_pb.ListGroupsResponse:
        await _principal(self.calls, "ListGroups", context)
        return id_pb.ListGroupsResponse(groups=list(self.groups.values()))

    async def WhoAmI(self, request: Any, context: Any) -> id_pb.Principal:
        user, admin, groups = await _principal(self.calls, "WhoAmI", context)
        return id_pb.Principal(user=user, admin=admin, groups=groups, token_id="tok-0")

    async def Authenticate(self, request: Any, context: Any) -> id_pb.Principal:
        if request.token not in TOKENS:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
        user, admin, groups = TOKENS[request.token]
        return id_pb.Principal(user=user, admin=admin, groups=groups, token_id="tok-0")


class FakeEventAdmin(ev_grpc.EventAdminServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def ListEvents(self, request: Any, context: Any) -> ev_pb.ListEventsResponse:
        await _principal(self.calls, "ListEvents", context)
        events = [
            ev_pb.Event(
                event_id=f"e-{n}",
                stream_id="team-a" if n % 2 else "team-b",
                version=n,
                aggregate="group_quota",
                event_type="GroupQuotaSet",
                schema_version=1,
                payload_json=json.dumps({"group": "team-a", "cpu": n}),
                metadata_json=json.dumps({"actor": "admin"}),
                recorded_at=RECORDED,
                service="quota",
                position=n,
            )
            for n in range(1, 6)
        ]
        if request.stream_id:
            events = [e for e in events if e.stream_id == request.stream_id]
        events = [e for e in events if e.position > request.after_position]
        events = events[: request.limit or 100]
        last = events[-1].position if events else request.after_position
        return ev_pb.ListEventsResponse(events=events, last_position=last)

    async def GetLag(self, request: Any, context: Any) -> ev_pb.GetLagResponse:
        await _principal(self.calls, "GetLag", context)
        return ev_pb.GetLagResponse(
            consumers=[
                ev_pb.ConsumerLag(name="usage", service="quota", pending=3, ack_pending=1),
                ev_pb.ConsumerLag(name="outbox-relay", service="quota", outbox_pending=2),
            ]
        )

    async def ReplayProjection(self, request: Any, context: Any) -> Any:
        await _admin(self.calls, "ReplayProjection", context)
        if request.projection == "unknown":
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                "projection unknown does not exist (known: usage, catalog)",
            )
        drifted = request.projection == "drifted"
        return ev_pb.ReplayProjectionResponse(
            projection=request.projection,
            events=1200,
            seconds=0.5,
            events_per_second=2400.0,
            swapped=not request.check_only,
            equal=not drifted,
            differences=["group team-a: cpu 4 != 5"] if drifted else [],
        )


@dataclass
class FakeServer:
    address: str
    calls: Calls


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ``(add_XServicer_to_server, servicer)``: what ``serving`` puts on its server.
Servicer = tuple[Callable[[Any, grpc.aio.Server], None], object]


@contextlib.asynccontextmanager
async def serving(*servicers: Servicer) -> AsyncIterator[str]:
    """A grpc.aio server with the servicers on a free local port; yields its address."""
    server = grpc.aio.server()
    for add, servicer in servicers:
        add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture(scope="session")
async def fake_server() -> AsyncIterator[FakeServer]:
    calls = Calls()
    async with serving(
        (q_grpc.add_QuotaServiceServicer_to_server, FakeQuota(calls)),
        (id_grpc.add_IdentityServiceServicer_to_server, FakeIdentity(calls)),
        (ev_grpc.add_EventAdminServicer_to_server, FakeEventAdmin(calls)),
    ) as address:
        yield FakeServer(address=address, calls=calls)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own Shipyard settings must not leak into the tests."""
    for name in list(os.environ):
        if name.startswith("SHIPYARD_"):
            monkeypatch.delenv(name)


def write_config(path: Path, token: str | None, endpoints: dict[str, str] | None = None) -> Path:
    """A Shipyard home (made if need be) whose ``config.json`` holds ``token`` and
    ``endpoints``; returns the home."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"token": token, "endpoints": endpoints or {}}))
    return path


def write_home(path: Path, address: str, token: str | None) -> Path:
    """A Shipyard home whose config points every service at ``address``."""
    return write_config(path, token, {name: address for name in EVENT_SOURCED_SERVICES})


@pytest.fixture
def make_home(tmp_path: Path) -> Any:
    """Factory: ``make_home(address, token)`` writes a home pointing keys and quota there."""

    def make(address: str, token: str | None = ADMIN_TOKEN, name: str = "home") -> Path:
        return write_home(tmp_path / name, address, token)

    return make


@pytest.fixture
def home(make_home: Any, fake_server: FakeServer) -> Path:
    """A home with the admin token and both services at the fake server."""
    path: Path = make_home(fake_server.address)
    return path


@pytest.fixture
def dead_home(make_home: Any) -> Path:
    """A home whose services point at a port nothing listens on."""
    path: Path = make_home(f"127.0.0.1:{free_port()}", name="dead")
    return path


@pytest.fixture
def unused_port() -> int:
    """A local port nothing listens on."""
    return free_port()


@pytest.fixture
def tokens() -> dict[str, str]:
    """The tokens the fake servers know: ``admin`` and ``user`` (ana, member of team-a)."""
    return {"admin": ADMIN_TOKEN, "user": USER_TOKEN}


async def run(func: Any, *args: Any, **kwargs: Any) -> Any:
    """The client blocks; the fake server lives on this event loop, so call off it."""
    return await asyncio.to_thread(func, *args, **kwargs)


def invoke(home: Path | None, *args: str, input: str | None = None, env: Any = None) -> Result:
    """Runs the CLI with ``--home`` (when given) the way a shell would."""
    argv = ["--home", str(home), *args] if home is not None else list(args)
    return CliRunner().invoke(
        cli, argv, prog_name="shipyard", catch_exceptions=False, input=input, env=env
    )


async def shipyard(
    home: Path | None, *args: str, input: str | None = None, env: Any = None
) -> Result:
    """``invoke`` off the event loop that serves the fake server."""
    return await asyncio.to_thread(invoke, home, *args, input=input, env=env)


def assert_one_line_error(result: Result, exit_code: int = 1) -> str:
    """The one ``error: ...`` line a failed command prints on stderr (and no traceback)."""
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


async def assert_json_output(home: Path, *args: str) -> Any:
    """Runs a command with ``--json``: it succeeds and prints valid JSON (returned parsed)."""
    result = await shipyard(home, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def assert_text_output(home: Path, *args: str) -> str:
    """Runs a command without ``--json``: it succeeds and prints something (returned)."""
    result = await shipyard(home, *args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    return result.stdout
