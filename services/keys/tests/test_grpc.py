"""The keys service over real gRPC: wiring, permissions, errors, and its command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shipyard.keys.v1 import identity_pb2 as pb
from shipyard.keys.v1 import identity_pb2_grpc
from shipyard_core import db
from shipyard_core.embedded import free_port
from shipyard_core.grpckit import MISSING_TOKEN_MESSAGE, bearer_metadata
from shipyard_core.projections.consistency import projection_has_leader
from shipyard_keys.main import bootstrap_admin, build
from shipyard_keys.projections import IdentityProjection
from shipyard_testing import wait_for

from .conftest import Server, keys_settings


async def _leading(dsn: str) -> bool:
    conn = await db.connect(dsn)
    try:
        return await projection_has_leader(conn, IdentityProjection)
    finally:
        await conn.close()


async def _admin_token(server: Server) -> str:
    # bootstrap-admin waits for the projection only when a runner leads it; let it.
    await wait_for(lambda: _leading(server.settings.database_url), message="no runner")
    outcome = await bootstrap_admin(server.settings, "admin")
    assert outcome.created and outcome.token is not None
    return outcome.token.token


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value.code(), failed.value.details() or ""


async def test_users_groups_and_tokens_over_grpc(server: Server) -> None:
    stub = server.stub
    admin = bearer_metadata(await _admin_token(server))
    group = await stub.CreateGroup(pb.CreateGroupRequest(name="team-a"), metadata=admin)
    assert group.name == "team-a" and group.created_at.seconds > 0

    created = await stub.CreateUser(
        pb.CreateUserRequest(name="alice", groups=["team-a"]), metadata=admin
    )
    assert created.token.startswith("sy_") and created.token_id.startswith("tok_")
    assert list(created.user.groups) == ["team-a"] and created.user.created_by == "admin"
    alice = bearer_metadata(created.token)

    # The token works the instant CreateUser returned, for the public check and as a
    # credential.
    checked = await stub.Authenticate(pb.AuthenticateRequest(token=created.token))
    assert (checked.user, checked.admin, list(checked.groups), checked.token_id) == (
        "alice",
        False,
        ["team-a"],
        created.token_id,
    )
    me = await stub.WhoAmI(pb.WhoAmIRequest(), metadata=alice)
    assert me == checked

    users = await stub.ListUsers(pb.ListUsersRequest(), metadata=admin)
    assert [(u.name, u.admin) for u in users.users] == [("admin", True), ("alice", False)]
    await stub.CreateGroup(pb.CreateGroupRequest(name="team-b"), metadata=admin)
    mine = await stub.ListGroups(pb.ListGroupsRequest(), metadata=alice)
    assert [(g.name, list(g.members)) for g in mine.groups] == [("team-a", ["alice"])]
    added = await stub.AddMember(pb.AddMemberRequest(group="team-b", user="alice"), metadata=admin)
    assert list(added.members) == ["alice"]
    assert list((await stub.WhoAmI(pb.WhoAmIRequest(), metadata=alice)).groups) == [
        "team-a",
        "team-b",
    ]
    await stub.RemoveMember(pb.RemoveMemberRequest(group="team-a", user="alice"), metadata=admin)
    assert list((await stub.WhoAmI(pb.WhoAmIRequest(), metadata=alice)).groups) == ["team-b"]

    # Alice issues and revokes her own token; the revoked one is refused at once.
    extra = await stub.IssueToken(pb.IssueTokenRequest(user="alice"), metadata=alice)
    await stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer_metadata(extra.token))
    await stub.RevokeToken(
        pb.RevokeTokenRequest(user="alice", token_id=extra.token_id), metadata=alice
    )
    code, details = await _code(
        stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer_metadata(extra.token))
    )
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
    code, details = await _code(stub.Authenticate(pb.AuthenticateRequest(token=extra.token)))
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
    # Revoking the token in use ends the session too.
    await stub.RevokeToken(
        pb.RevokeTokenRequest(user="alice", token_id=created.token_id), metadata=admin
    )
    code, _ = await _code(stub.WhoAmI(pb.WhoAmIRequest(), metadata=alice))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_refusals_over_grpc_have_their_status_and_a_clear_message(server: Server) -> None:
    stub = server.stub
    admin = bearer_metadata(await _admin_token(server))
    bob = await stub.CreateUser(pb.CreateUserRequest(name="bob"), metadata=admin)
    as_bob = bearer_metadata(bob.token)

    code, details = await _code(
        stub.CreateUser(pb.CreateUserRequest(name="mallory", admin=True), metadata=as_bob)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == "admin only: create users (user 'bob' is not an admin; ask an admin)"
    code, details = await _code(stub.ListUsers(pb.ListUsersRequest(), metadata=as_bob))
    assert (code, details) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "admin only: list users (user 'bob' is not an admin; ask an admin)",
    )
    code, details = await _code(
        stub.IssueToken(pb.IssueTokenRequest(user="admin"), metadata=as_bob)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "may issue tokens only for themselves" in details

    code, details = await _code(stub.WhoAmI(pb.WhoAmIRequest()))
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN_MESSAGE)
    code, details = await _code(
        stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer_metadata("sy_nonsense"))
    )
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")

    code, details = await _code(
        stub.CreateUser(pb.CreateUserRequest(name="Bad_Name"), metadata=admin)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("name: 'Bad_Name' is not a valid name (use 1-63 lowercase")
    code, details = await _code(
        stub.AddMember(pb.AddMemberRequest(group="team-a", user="b o b"), metadata=admin)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("user: ")
    code, details = await _code(
        stub.AddMember(pb.AddMemberRequest(group="nope", user="bob"), metadata=admin)
    )
    assert code == grpc.StatusCode.NOT_FOUND and "group 'nope' does not exist" in details
    code, _ = await _code(stub.CreateUser(pb.CreateUserRequest(name="bob"), metadata=admin))
    assert code == grpc.StatusCode.ALREADY_EXISTS

    # Health and reflection are there, without a token.
    health = health_pb2_grpc.HealthStub(server.channel)
    answer = await health.Check(
        health_pb2.HealthCheckRequest(service="shipyard.keys.v1.IdentityService")
    )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _env(database_url: str, nats_url: str, port: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env.update(
        SHIPYARD_DATABASE_URL=database_url,
        SHIPYARD_NATS_URL=nats_url,
        SHIPYARD_GRPC_PORT=str(port),
        SHIPYARD_LOG_JSON="false",
    )
    return env


async def _bootstrap_cli(env: dict[str, str], name: str = "admin") -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shipyard_keys",
        "bootstrap-admin",
        "--name",
        name,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 1, lines  # exactly one line, and it is JSON
    data: dict[str, Any] = json.loads(lines[0])
    return data


async def test_bootstrap_admin_command_works_without_a_server(
    database_url: str, nats_url: str
) -> None:
    env = _env(database_url, nats_url)
    first, second = await asyncio.gather(_bootstrap_cli(env), _bootstrap_cli(env))
    assert sorted([first["created"], second["created"]]) == [False, True]
    made = first if first["created"] else second
    assert set(made) == {"user", "token", "token_id", "created"} and made["user"] == "admin"
    assert (second if made is first else first) == {"created": False, "user": "admin"}
    assert not await _leading(database_url)  # nobody was projecting; nobody waited

    # The server, started afterwards, catches up and accepts the token.
    settings = keys_settings(database_url, nats_url)
    host = await build(settings)
    async with host, grpc.aio.insecure_channel(host.address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)

        async def accepted() -> pb.Principal:
            return await stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer_metadata(made["token"]))

        me = await wait_for(accepted, timeout=20, ignore=(grpc.aio.AioRpcError,))
        assert (me.user, me.admin, me.token_id) == ("admin", True, made["token_id"])
        assert await _bootstrap_cli(env, "root") == {"created": False, "user": "admin"}


async def test_the_service_process_serves_and_its_bootstrap_token_works_at_once(
    database_url: str, nats_url: str
) -> None:
    port = free_port()
    env = _env(database_url, nats_url, port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shipyard_keys",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

            await wait_for(serving, timeout=30, ignore=(grpc.aio.AioRpcError,))
            await wait_for(lambda: _leading(database_url), timeout=10, message="no runner")
            made = await _bootstrap_cli(env)
            assert made["created"] is True
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            me = await stub.WhoAmI(pb.WhoAmIRequest(), metadata=bearer_metadata(made["token"]))
            assert me.user == "admin" and me.admin
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]


async def test_no_secret_reaches_the_event_store_through_grpc(server: Server) -> None:
    admin_token = await _admin_token(server)
    created = await server.stub.CreateUser(
        pb.CreateUserRequest(name="gina"), metadata=bearer_metadata(admin_token)
    )
    conn: asyncpg.Connection = await db.connect(server.settings.database_url)
    try:
        rows = await conn.fetch("SELECT payload::text AS p, metadata::text AS m FROM keys.events")
    finally:
        await conn.close()
    stored = "\n".join(r["p"] + r["m"] for r in rows)
    for secret in (admin_token, created.token):
        assert secret.removeprefix("sy_") not in stored
