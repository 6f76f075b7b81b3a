"""Deployment client keys: the ClientKeys aggregate, and the keys service over real gRPC,
PostgreSQL and NATS, asking a stand-in scheduler (a grpc.aio SchedulerService that knows
a few deployments and checks the forwarded token the way the real one does; the
cross-service end-to-end test runs the real scheduler)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shipyard.keys.v1 import client_keys_pb2 as pb
from shipyard.keys.v1 import client_keys_pb2_grpc as pb_grpc
from shipyard.keys.v1 import identity_pb2 as id_pb
from shipyard.keys.v1 import identity_pb2_grpc as id_grpc
from shipyard.scheduler.v1 import scheduler_pb2 as sched_pb
from shipyard.scheduler.v1 import scheduler_pb2_grpc as sched_grpc
from shipyard_core import bus, db
from shipyard_core.auth import (
    Authenticator,
    InternalTokenAuthenticator,
    Principal,
    RemoteAuthenticator,
)
from shipyard_core.embedded import free_port
from shipyard_core.errors import AlreadyExists, NotFound, ShipyardError
from shipyard_core.eventstore import EventStore, NewEvent, ensure_schema
from shipyard_core.grpckit import bearer_metadata, bearer_token
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.outbox import OutboxRelay
from shipyard_core.projections import replay_projection
from shipyard_core.projections.consistency import projection_has_leader
from shipyard_keys.app import KeyUsage
from shipyard_keys.domain import ClientKeyCreated, ClientKeyRevoked, ClientKeys, tokens
from shipyard_keys.main import bootstrap_admin, build
from shipyard_keys.projections import (
    SCHEDULER_SCHEMA,
    ClientKeysProjection,
    DeploymentOwnersProjection,
    IdentityProjection,
)
from shipyard_keys.settings import KeysSettings
from shipyard_testing import StaticAuthenticator, wait_for

from .conftest import keys_settings

INTERNAL = "internal-token-of-this-installation"
ADMIN = "sy_admin_token"
ALICE = "sy_alice_token"  # team-a
BOB = "sy_bob_token"  # team-b
PRINCIPALS = {
    ADMIN: Principal(user="admin", admin=True),
    ALICE: Principal(user="alice", admin=False, groups=frozenset({"team-a"})),
    BOB: Principal(user="bob", admin=False, groups=frozenset({"team-b"})),
}
# What the stand-in scheduler knows: deployment -> owning group.
DEPLOYMENTS = {"iris": "team-a", "wine": "team-a", "mnist": "team-b"}


def _as(token: str) -> tuple[tuple[str, str], ...]:
    return bearer_metadata(token)


# -- the domain, without infrastructure ---------------------------------------------------


def test_one_active_key_per_client_and_idempotent_revocation() -> None:
    keys = ClientKeys("iris")
    first = keys.create(group="team-a", client="shop", created_by="alice")
    assert first.secret.startswith("sk_") and re.fullmatch(r"ck_[0-9a-f]{8}", first.key_id)
    assert first.secret not in repr(first)
    created = keys.pending[0]
    assert isinstance(created, ClientKeyCreated)
    assert created.key_hash == hashlib.sha256(first.secret.encode()).hexdigest()
    assert first.secret not in created.model_dump_json()

    with pytest.raises(AlreadyExists, match=r"revoke it first \(`shipyard keys revoke iris shop`"):
        keys.create(group="team-a", client="shop", created_by="alice")
    other = keys.create(group="team-a", client="batch", created_by="alice")
    assert other.key_id != first.key_id

    state, changed = keys.revoke("shop", revoked_by="alice")
    assert (state.key_id, state.revoked, changed) == (first.key_id, True, True)
    events = len(keys.pending)
    state, changed = keys.revoke("shop", revoked_by="alice")  # again: nothing new
    assert (state.key_id, changed, len(keys.pending)) == (first.key_id, False, events)
    with pytest.raises(NotFound, match="has no client key for client 'ghost'"):
        keys.revoke("ghost", revoked_by="alice")
    again = keys.create(group="team-a", client="shop", created_by="alice")  # free again
    assert keys.active == {"batch": other.key_id, "shop": again.key_id}


def test_a_new_owner_of_the_name_revokes_the_previous_owners_keys() -> None:
    keys = ClientKeys("iris")
    old = keys.create(group="team-a", client="shop", created_by="alice")
    keys.pending.clear()
    # iris was deleted and created again by team-b; its first key retires team-a's.
    new = keys.create(group="team-b", client="shop", created_by="bob")
    revoked, created = keys.pending
    assert isinstance(revoked, ClientKeyRevoked) and revoked.key_id == old.key_id
    assert isinstance(created, ClientKeyCreated) and created.group == "team-b"
    assert keys.group == "team-b" and keys.active == {"shop": new.key_id}
    # The previous owner's client names are no longer this deployment's.
    latest = keys.latest("shop")
    assert latest is not None and latest.key_id == new.key_id


# -- a stand-in scheduler -----------------------------------------------------------------


@dataclass
class StandInScheduler(sched_grpc.SchedulerServiceServicer):
    """GetDeployment only: authenticates the forwarded token itself and hides deployments
    of other groups behind NOT_FOUND, as the real scheduler does."""

    authenticator: Authenticator
    deployments: dict[str, str] = field(default_factory=lambda: dict(DEPLOYMENTS))
    tokens_seen: list[str] = field(default_factory=list)

    async def GetDeployment(self, request: Any, context: Any) -> sched_pb.Deployment:
        metadata = {k: v for k, v in context.invocation_metadata() or ()}
        try:
            token = bearer_token(metadata)
            caller = await self.authenticator.authenticate(token)
        except ShipyardError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
            raise AssertionError("unreachable") from None
        self.tokens_seen.append(token)
        group = self.deployments.get(request.name)
        if group is None or not caller.can_see(group):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"deployment {request.name!r} does not exist; see `shipyard deploy list`",
            )
        return sched_pb.Deployment(name=request.name, group=group)


@contextlib.asynccontextmanager
async def serving_scheduler(scheduler: StandInScheduler) -> AsyncIterator[str]:
    server = grpc.aio.server()
    sched_grpc.add_SchedulerServiceServicer_to_server(scheduler, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@dataclass
class Keys:
    """The keys service (fixed user tokens, the internal token) and its stand-in scheduler."""

    settings: KeysSettings
    host: ServiceHost
    stub: pb_grpc.ClientKeyServiceStub
    scheduler: StandInScheduler


@pytest.fixture
async def keys(database_url: str, nats_url: str) -> AsyncIterator[Keys]:
    # Like the real scheduler: user tokens, and the installation's internal token.
    known = InternalTokenAuthenticator(StaticAuthenticator(PRINCIPALS), INTERNAL)
    scheduler = StandInScheduler(known)
    async with serving_scheduler(scheduler) as scheduler_addr:
        settings = keys_settings(database_url, nats_url).model_copy(
            update={"internal_token": INTERNAL, "scheduler_addr": scheduler_addr}
        )
        # The real adapter (SchedulerDeployments at scheduler_addr) talks to the stand-in.
        host = await build(settings, authenticator=StaticAuthenticator(PRINCIPALS))
        await host.start()
        channel = grpc.aio.insecure_channel(host.address)
        try:
            yield Keys(settings, host, pb_grpc.ClientKeyServiceStub(channel), scheduler)
        finally:
            await channel.close()
            await host.stop()


async def _refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value.code(), failed.value.details() or ""


async def _create(k: Keys, deployment: str, client: str, token: str = ALICE) -> Any:
    return await k.stub.CreateClientKey(
        pb.CreateClientKeyRequest(deployment=deployment, client=client), metadata=_as(token)
    )


async def _verify(k: Keys, deployment: str, secret: str, client: str = "") -> Any:
    return await k.stub.VerifyClientKey(
        pb.VerifyClientKeyRequest(deployment=deployment, secret=secret, client=client),
        metadata=_as(INTERNAL),
    )


async def _list(k: Keys, deployment: str, token: str = ALICE, *, revoked: bool = False) -> Any:
    return await k.stub.ListClientKeys(
        pb.ListClientKeysRequest(deployment=deployment, include_revoked=revoked),
        metadata=_as(token),
    )


async def _revoke(k: Keys, deployment: str, client: str, token: str = ALICE) -> Any:
    return await k.stub.RevokeClientKey(
        pb.RevokeClientKeyRequest(deployment=deployment, client=client), metadata=_as(token)
    )


# -- over gRPC ----------------------------------------------------------------------------


async def test_a_key_works_at_once_and_a_revocation_holds_at_once(keys: Keys) -> None:
    created = await _create(keys, "iris", "shop")
    key = created.key
    assert created.secret.startswith("sk_") and key.key_id.startswith("ck_")
    assert (key.deployment, key.group, key.client, key.created_by) == (
        "iris",
        "team-a",
        "shop",
        "alice",
    )
    assert key.created_at.seconds > 0 and not key.HasField("last_used_at") and not key.revoked
    # The scheduler was asked with the caller's own token, not the service's.
    assert keys.scheduler.tokens_seen == [ALICE]

    # No waiting anywhere below: each command answered once its effect was visible.
    verified = await _verify(keys, "iris", created.secret)
    assert (verified.client, verified.key_id) == ("shop", key.key_id)
    basic = await _verify(keys, "iris", created.secret, client="shop")  # HTTP Basic
    assert basic.client == "shop"

    listed = (await _list(keys, "iris")).keys
    assert [(k.client, k.key_id) for k in listed] == [("shop", key.key_id)]
    assert listed[0].HasField("last_used_at")  # the verify above was recorded
    assert listed[0].last_used_at.seconds >= key.created_at.seconds
    assert all(not hasattr(k, "secret") for k in listed)

    revoked = await _revoke(keys, "iris", "shop")
    assert (revoked.key_id, revoked.revoked, revoked.revoked_by) == (key.key_id, True, "alice")
    assert revoked.HasField("last_used_at") and revoked.revoked_at.seconds > 0
    code, details = await _refused(_verify(keys, "iris", created.secret))
    when = revoked.revoked_at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert details == (
        f"client key {key.key_id} (client 'shop') of deployment 'iris' was revoked at {when}"
    )

    assert (await _list(keys, "iris")).keys == []
    everything = (await _list(keys, "iris", revoked=True)).keys
    assert [(k.key_id, k.revoked) for k in everything] == [(key.key_id, True)]
    # Revoking again changes nothing and answers the same key.
    assert (await _revoke(keys, "iris", "shop")).key_id == key.key_id

    # The name is free again; the new key works, the old one stays refused.
    second = await _create(keys, "iris", "shop")
    assert (await _verify(keys, "iris", second.secret)).key_id == second.key.key_id
    code, _ = await _refused(_verify(keys, "iris", created.secret))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert [k.key_id for k in (await _list(keys, "iris", revoked=True)).keys] == [
        key.key_id,
        second.key.key_id,
    ]


async def test_the_secret_is_shown_once_and_kept_nowhere(keys: Keys) -> None:
    created = await _create(keys, "iris", "shop")
    await _verify(keys, "iris", created.secret)
    await _revoke(keys, "iris", "shop")
    secret = created.secret
    assert secret not in str(await _list(keys, "iris", revoked=True))

    conn = await db.connect(keys.settings.database_url)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'keys'"
        )
        names = {r["table_name"] for r in tables}
        assert {"events", "outbox", "client_keys", "client_key_usage"} <= names
        dump = []
        for name in sorted(names):
            rows = await conn.fetch(f"SELECT * FROM keys.{name}")
            dump += [json.dumps(dict(r), default=_text) for r in rows]
        payloads = await conn.fetch(
            "SELECT event_type, payload::text AS payload FROM keys.events ORDER BY position"
        )
    finally:
        await conn.close()
    text = "\n".join(dump)
    for fragment in (secret, secret.removeprefix("sk_")):
        assert fragment not in text
    assert [r["event_type"] for r in payloads] == ["ClientKeyCreated", "ClientKeyRevoked"]
    assert tokens.hash_token(secret) in payloads[0]["payload"]  # only the hash is kept

    # Nor on the bus: the published envelopes, as other services receive them.
    nc = await bus.connect(keys.settings.nats_url, "test-reader")
    try:
        js = nc.jetstream()

        async def published() -> list[bytes]:
            info = await js.stream_info(bus.EVENTS_STREAM)
            if info.state.messages < 2:
                return []
            sub = await js.pull_subscribe(
                "events.keys.client_keys.>",
                durable=None,
                stream=bus.EVENTS_STREAM,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
            )
            try:
                return [m.data for m in await sub.fetch(2, timeout=5)]
            finally:
                await sub.unsubscribe()

        bodies = b"\n".join(await wait_for(published, message="relay lags")).decode()
    finally:
        await nc.drain()
    assert "ClientKeyCreated" in bodies and secret.removeprefix("sk_") not in bodies


def _text(value: Any) -> str:
    return value.hex() if isinstance(value, bytes) else str(value)


async def test_verify_refusals_say_why(keys: Keys) -> None:
    iris = await _create(keys, "iris", "shop")
    await _create(keys, "wine", "shop")
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED

    assert await _refused(_verify(keys, "iris", "sk_" + "x" * 43)) == (
        unauthenticated,
        "unknown client key",
    )
    code, details = await _refused(_verify(keys, "iris", ALICE))  # a user token is no key
    assert code == unauthenticated and details.startswith("malformed client key: ")
    code, details = await _refused(_verify(keys, "iris", "sk_" + "x" * 300))
    assert code == unauthenticated and details.startswith("malformed client key: ")
    assert await _refused(_verify(keys, "iris", "")) == (
        unauthenticated,
        "empty client key: pass the key to check",
    )
    # Another deployment's key: refused without naming the deployment it does open.
    code, details = await _refused(_verify(keys, "mnist", iris.secret))
    assert code == unauthenticated
    assert details == "this client key is not a key of deployment 'mnist'"
    assert "iris" not in details
    code, details = await _refused(_verify(keys, "iris", iris.secret, client="batch"))
    assert code == unauthenticated
    assert details.startswith("client name 'batch' does not match the key's client")


async def test_verify_is_internal(keys: Keys) -> None:
    created = await _create(keys, "iris", "shop")
    request = pb.VerifyClientKeyRequest(deployment="iris", secret=created.secret)
    code, details = await _refused(keys.stub.VerifyClientKey(request, metadata=_as(ALICE)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details.startswith("internal only: verify client keys")
    code, _ = await _refused(keys.stub.VerifyClientKey(request))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # Admins may (require_internal lets them, for debugging); the internal token may not
    # do anything a user does.
    assert (await keys.stub.VerifyClientKey(request, metadata=_as(ADMIN))).client == "shop"
    code, _ = await _refused(_create(keys, "iris", "other", token=INTERNAL))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_other_groups_get_not_found_everywhere(keys: Keys) -> None:
    await _create(keys, "iris", "shop")
    missing = "deployment 'iris' does not exist; see `shipyard deploy list`"
    nonexistent = "deployment 'nope' does not exist; see `shipyard deploy list`"
    assert await _refused(_create(keys, "iris", "spy", token=BOB)) == (
        grpc.StatusCode.NOT_FOUND,
        missing,
    )
    # Exactly what a deployment that does not exist answers.
    assert await _refused(_create(keys, "nope", "spy", token=BOB)) == (
        grpc.StatusCode.NOT_FOUND,
        nonexistent,
    )
    assert await _refused(_list(keys, "iris", BOB)) == (grpc.StatusCode.NOT_FOUND, missing)
    assert await _refused(_list(keys, "nope", BOB)) == (grpc.StatusCode.NOT_FOUND, nonexistent)
    # Revoking another group's client reads like revoking a client that never existed.
    theirs = await _refused(_revoke(keys, "iris", "shop", token=BOB))
    assert theirs == (
        grpc.StatusCode.NOT_FOUND,
        "deployment 'iris' has no client key for client 'shop'; see `shipyard keys list iris`",
    )
    code, details = await _refused(_revoke(keys, "iris", "ghost"))
    assert details == theirs[1].replace("'shop'", "'ghost'") and code == theirs[0]
    # Nothing changed: alice's key is still active; the admin sees it too.
    assert [k.client for k in (await _list(keys, "iris", ADMIN)).keys] == ["shop"]
    # Bob works in his own group.
    assert (await _create(keys, "mnist", "shop", token=BOB)).key.group == "team-b"


async def test_own_deployment_without_keys_lists_empty(keys: Keys) -> None:
    assert (await _list(keys, "wine")).keys == []
    assert (await _list(keys, "wine", ADMIN, revoked=True)).keys == []


async def test_duplicate_active_client_is_already_exists(keys: Keys) -> None:
    first = await _create(keys, "iris", "shop")
    code, details = await _refused(_create(keys, "iris", "shop"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert details == (
        f"client 'shop' of deployment 'iris' has an active key ({first.key.key_id}) already; "
        "revoke it first (`shipyard keys revoke iris shop`) or choose another client name"
    )
    # Another deployment may have a client of the same name.
    assert (await _create(keys, "wine", "shop")).key.deployment == "wine"


async def test_racing_creates_give_one_key_per_client(keys: Keys) -> None:
    outcomes = await asyncio.gather(
        *(_create(keys, "iris", "shop") for _ in range(6)), return_exceptions=True
    )
    created = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(created) == 1 and len(refused) == 5
    assert {r.code() for r in refused} == {grpc.StatusCode.ALREADY_EXISTS}
    assert [k.key_id for k in (await _list(keys, "iris", revoked=True)).keys] == [
        created[0].key.key_id
    ]


@pytest.mark.parametrize(
    ("deployment", "client", "field_name"),
    [
        ("Iris_Prod", "shop", "deployment"),
        ("", "shop", "deployment"),
        ("x" * 41, "shop", "deployment"),
        ("9iris", "shop", "deployment"),
        ("iris", "Bad Name", "client"),
        ("iris", "", "client"),
        ("iris", "-shop", "client"),
    ],
)
async def test_bad_names_are_invalid_arguments_naming_the_field(
    keys: Keys, deployment: str, client: str, field_name: str
) -> None:
    calls = [_create(keys, deployment, client), _revoke(keys, deployment, client)]
    if field_name == "deployment":
        calls += [_list(keys, deployment), _verify(keys, deployment, "sk_" + "x" * 43)]
    for call in calls:
        code, details = await _refused(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(f"{field_name}: "), details
    assert keys.scheduler.tokens_seen == []  # refused before asking anyone


async def test_an_unreachable_scheduler_is_unavailable_and_nothing_changes(
    database_url: str, nats_url: str
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    settings = keys_settings(database_url, nats_url).model_copy(
        update={"scheduler_addr": dead, "scheduler_timeout_seconds": 2.0}
    )
    host = await build(settings, authenticator=StaticAuthenticator(PRINCIPALS))
    await host.start()
    channel = grpc.aio.insecure_channel(host.address)
    try:
        stub = pb_grpc.ClientKeyServiceStub(channel)
        code, details = await _refused(
            stub.CreateClientKey(
                pb.CreateClientKeyRequest(deployment="iris", client="shop"), metadata=_as(ALICE)
            )
        )
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details.startswith(f"the scheduler service at {dead} is unavailable")
        assert details.endswith("nothing was changed, retry in a moment")
        conn = await db.connect(database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM keys.events") == 0
        finally:
            await conn.close()
    finally:
        await channel.close()
        await host.stop()


# -- usage telemetry ------------------------------------------------------------------------


async def test_last_used_is_written_at_most_once_a_minute(keys: Keys) -> None:
    created = await _create(keys, "iris", "shop")
    key_id = created.key.key_id
    pool = await db.create_pool(keys.settings.database_url, min_size=1, max_size=2)
    now = [1000.0]
    usage = KeyUsage(pool, clock=lambda: now[0])

    async def last_used() -> datetime:
        value: datetime = await pool.fetchval(
            "SELECT last_used_at FROM keys.client_key_usage WHERE key_id = $1", key_id
        )
        return value

    async def age_by(seconds: int) -> datetime:
        await pool.execute(
            "UPDATE keys.client_key_usage SET last_used_at = last_used_at - "
            "make_interval(secs => $2) WHERE key_id = $1",
            key_id,
            seconds,
        )
        return await last_used()

    try:
        await usage.touch("iris", key_id)
        assert await last_used() is not None
        # Within the minute this process does not even ask the database.
        aged = await age_by(120)
        now[0] += 30
        await usage.touch("iris", key_id)
        assert await last_used() == aged
        # Past the minute it asks; the row is written only if it is a minute old.
        now[0] += 31
        await usage.touch("iris", key_id)
        assert await last_used() > aged
        recent = await age_by(10)  # another process wrote it 10 s ago
        now[0] += 61
        await usage.touch("iris", key_id)
        assert await last_used() == recent
    finally:
        await pool.close()


# -- deployments deleted or re-created by another group ------------------------------------


async def _append_scheduler_event(
    store: EventStore, name: str, event_type: str, payload: dict[str, Any]
) -> None:
    stream = await store.read_stream(f"deployment:{name}")
    event = NewEvent(
        aggregate="deployment",
        aggregate_id=name,
        event_type=event_type,
        schema_version=1,
        payload=payload,
        metadata={"actor": "test"},
    )
    await store.append([event], len(stream))


@pytest.fixture
async def scheduler_events(keys: Keys) -> AsyncIterator[EventStore]:
    """The scheduler's event store in the same database, relayed to JetStream, as the
    real scheduler's would be (only its events matter to the keys service)."""
    settings = keys.settings
    pool = await db.create_pool(settings.database_url, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await ensure_schema(conn, SCHEDULER_SCHEMA)
    nc = await bus.connect(settings.nats_url, "test-scheduler")
    relay = OutboxRelay(settings.database_url, nc.jetstream(), SCHEDULER_SCHEMA)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield EventStore(pool, SCHEDULER_SCHEMA)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await nc.drain()
        await pool.close()


async def test_keys_stop_working_when_their_deployment_is_deleted_or_changes_hands(
    keys: Keys, scheduler_events: EventStore
) -> None:
    store = scheduler_events
    await _append_scheduler_event(store, "iris", "DeploymentCreated", {"group": "team-a"})
    alice = await _create(keys, "iris", "shop")

    async def owned_by(group: str | None, deleted: bool) -> bool:
        row = await store.pool.fetchrow(
            "SELECT group_name, deleted FROM keys.deployment_owners WHERE name = 'iris'"
        )
        return row is not None and (row["group_name"], row["deleted"]) == (group, deleted)

    await wait_for(lambda: owned_by("team-a", False), message="DeploymentCreated not seen")
    assert (await _verify(keys, "iris", alice.secret)).client == "shop"

    await _append_scheduler_event(store, "iris", "DeploymentStopped", {})
    await _append_scheduler_event(store, "iris", "DeploymentDeleted", {})
    await wait_for(lambda: owned_by("team-a", True), message="DeploymentDeleted not seen")
    assert await _refused(_verify(keys, "iris", alice.secret)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "deployment 'iris' was deleted; its client keys no longer work",
    )

    # Team B takes the name: team A's key must not open team B's model.
    await _append_scheduler_event(store, "iris", "DeploymentCreated", {"group": "team-b"})
    keys.scheduler.deployments["iris"] = "team-b"
    await wait_for(lambda: owned_by("team-b", False), message="second life not seen")
    code, details = await _refused(_verify(keys, "iris", alice.secret))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert details == (
        f"client key {alice.key.key_id} was made for an earlier deployment named 'iris', "
        "since deleted; create a new key"
    )
    # Team A's client names do not block team B, nor show up in its list.
    assert (await _list(keys, "iris", BOB)).keys == []
    bob = await _create(keys, "iris", "shop", token=BOB)
    assert (await _verify(keys, "iris", bob.secret)).key_id == bob.key.key_id
    assert [k.key_id for k in (await _list(keys, "iris", BOB, revoked=True)).keys] == [
        bob.key.key_id
    ]
    code, _ = await _refused(_list(keys, "iris", ALICE))
    assert code == grpc.StatusCode.NOT_FOUND

    # Both read models rebuild from the event stores exactly.
    for projection in (ClientKeysProjection(), DeploymentOwnersProjection()):
        check = await replay_projection(projection, store.pool, swap=False)
        assert check.equal, check.differences


# -- with the real identity part --------------------------------------------------------------


async def test_real_users_and_the_internal_token(database_url: str, nats_url: str) -> None:
    """main.build as deployed: users authenticate against the identity projection, the
    internal token is recognised, and the scheduler checks forwarded tokens by asking
    keys' Authenticate (as the real scheduler does)."""
    remote: RemoteAuthenticator | None = None
    scheduler = StandInScheduler(StaticAuthenticator({}))
    async with serving_scheduler(scheduler) as scheduler_addr:
        settings = keys_settings(database_url, nats_url).model_copy(
            update={"internal_token": INTERNAL, "scheduler_addr": scheduler_addr}
        )
        host = await build(settings)
        await host.start()
        remote = RemoteAuthenticator(host.address)
        scheduler.authenticator = remote
        channel = grpc.aio.insecure_channel(host.address)
        try:
            await wait_for(lambda: _leading(database_url), message="identity runner")
            outcome = await bootstrap_admin(settings, "admin")
            assert outcome.token is not None
            identity = id_grpc.IdentityServiceStub(channel)
            admin = _as(outcome.token.token)
            await identity.CreateGroup(id_pb.CreateGroupRequest(name="team-a"), metadata=admin)
            user = await identity.CreateUser(
                id_pb.CreateUserRequest(name="alice", groups=["team-a"]), metadata=admin
            )
            k = Keys(settings, host, pb_grpc.ClientKeyServiceStub(channel), scheduler)
            created = await _create(k, "iris", "shop", token=user.token)
            assert created.key.created_by == "alice"
            assert (await _verify(k, "iris", created.secret)).client == "shop"
            # The internal token is nobody: no groups, no admin rights.
            listing = identity.ListUsers(id_pb.ListUsersRequest(), metadata=_as(INTERNAL))
            code, _ = await _refused(listing)
            assert code == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await channel.close()
            if remote is not None:
                await remote.close()
            await host.stop()


async def _leading(dsn: str) -> bool:
    conn = await db.connect(dsn)
    try:
        return await projection_has_leader(conn, IdentityProjection)
    finally:
        await conn.close()
