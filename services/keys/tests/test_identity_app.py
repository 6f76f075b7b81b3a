"""The identity app layer on real PostgreSQL and NATS (relay and projection running)."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shipyard_core import bus, db
from shipyard_core.auth import Principal
from shipyard_core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from shipyard_core.eventstore import EventStore, ensure_schema
from shipyard_core.projections import replay_projection
from shipyard_core.projections.consistency import projection_has_leader
from shipyard_keys.app import MALFORMED_TOKEN, UNKNOWN_TOKEN, IdentityCommands, IdentityQueries
from shipyard_keys.domain import tokens
from shipyard_keys.projections import SCHEMA, IdentityProjection
from shipyard_testing import wait_for

from .conftest import ROOT, Identity


async def test_a_new_users_token_authenticates_at_once_with_their_groups(
    identity: Identity,
) -> None:
    app = identity.commands
    await app.create_group(ROOT, "team-a", description="the A team")
    await app.create_group(ROOT, "team-b")

    created = await app.create_user(ROOT, "alice", groups=["team-b", "team-a", "team-a"])
    assert created.user.groups == ("team-a", "team-b")
    assert created.user.created_by == "root" and created.user.created_at is not None

    # No waiting: the command answered only once the projection had applied it.
    principal = await identity.queries.authenticate(created.token.token)
    assert principal == Principal(
        user="alice",
        admin=False,
        groups=frozenset({"team-a", "team-b"}),
        token_id=created.token.token_id,
    )
    # A second token is a second identity of the same user.
    second = await app.issue_token(ROOT, "alice", description="laptop")
    assert second.token != created.token.token and second.token_id != created.token.token_id
    again = await identity.queries.authenticate(second.token)
    assert again.user == "alice" and again.token_id == second.token_id

    # Membership changes are in the principal as soon as the command returns.
    group = await app.remove_member(ROOT, "team-a", "alice")
    assert group.members == () and group.description == "the A team"
    assert (await identity.queries.authenticate(second.token)).groups == {"team-b"}
    group = await app.add_member(ROOT, "team-a", "alice")
    assert group.members == ("alice",)
    assert (await identity.queries.authenticate(second.token)).groups == {"team-a", "team-b"}

    users = await identity.queries.list_users(ROOT)
    assert [(u.name, u.groups) for u in users] == [("alice", ("team-a", "team-b"))]


async def test_a_revoked_token_is_refused_at_once(identity: Identity) -> None:
    app = identity.commands
    created = await app.create_user(ROOT, "bob")
    bob = Principal(user="bob", admin=False)
    for _ in range(5):
        issued = await app.issue_token(bob, "bob")  # a user may issue their own
        assert (await identity.queries.authenticate(issued.token)).token_id == issued.token_id
        await app.revoke_token(bob, "bob", issued.token_id)
        with pytest.raises(Unauthenticated, match=UNKNOWN_TOKEN):
            await identity.queries.authenticate(issued.token)
        await app.revoke_token(ROOT, "bob", issued.token_id)  # repeating it is harmless
    # The first token was never revoked and still works.
    assert (await identity.queries.authenticate(created.token.token)).user == "bob"
    with pytest.raises(NotFound, match="has no token 'tok_0000beef'"):
        await app.revoke_token(ROOT, "bob", "tok_0000beef")
    with pytest.raises(Unauthenticated, match=UNKNOWN_TOKEN):
        await identity.queries.authenticate(tokens.new_token())
    with pytest.raises(Unauthenticated, match="malformed token"):
        await identity.queries.authenticate("Bearer sy_abc")
    assert MALFORMED_TOKEN.startswith("malformed token")


async def test_only_admins_manage_users_and_groups(identity: Identity) -> None:
    app, queries = identity.commands, identity.queries
    await app.create_group(ROOT, "team-a")
    await app.create_group(ROOT, "team-b")
    await app.create_user(ROOT, "carol", groups=["team-a"])
    await app.create_user(ROOT, "dave")
    carol = Principal(user="carol", admin=False, groups=frozenset({"team-a"}))

    with pytest.raises(PermissionDenied) as denied:
        await app.create_user(carol, "mallory", admin=True)
    assert str(denied.value) == (
        "admin only: create users (user 'carol' is not an admin; ask an admin)"
    )
    # Refused before anything else is looked at, even an invalid request.
    with pytest.raises(PermissionDenied, match="admin only: create users"):
        await app.create_user(carol, "Not A Name")
    with pytest.raises(PermissionDenied, match="admin only: list users"):
        await queries.list_users(carol)
    with pytest.raises(PermissionDenied, match="admin only: create groups"):
        await app.create_group(carol, "team-c")
    with pytest.raises(PermissionDenied, match="admin only: add group members"):
        await app.add_member(carol, "team-b", "carol")
    with pytest.raises(PermissionDenied, match="admin only: remove group members"):
        await app.remove_member(carol, "team-a", "dave")
    with pytest.raises(PermissionDenied, match="'carol' may issue tokens only for themselves"):
        await app.issue_token(carol, "dave")
    with pytest.raises(PermissionDenied, match="'carol' may revoke tokens only for themselves"):
        await app.revoke_token(carol, "dave", "tok_12345678")
    assert await identity.store.read_stream("user:mallory") == []

    # What a non-admin may do: their own tokens, their own groups, who they are.
    own = await app.issue_token(carol, "carol")
    await app.revoke_token(carol, "carol", own.token_id)
    assert [g.name for g in await queries.list_groups(carol)] == ["team-a"]
    assert [g.name for g in await queries.list_groups(ROOT)] == ["team-a", "team-b"]
    assert await queries.whoami(carol) == carol


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda app: app.create_user(ROOT, "Alice"), "name"),
        (lambda app: app.create_user(ROOT, ""), "name"),
        (lambda app: app.create_user(ROOT, "alice", groups=["ok", "bad_group"]), "groups"),
        (lambda app: app.create_group(ROOT, "-team"), "name"),
        (lambda app: app.create_group(ROOT, "team", description="x" * 501), "description"),
        (lambda app: app.add_member(ROOT, "team a", "alice"), "group"),
        (lambda app: app.add_member(ROOT, "team", "alice!"), "user"),
        (lambda app: app.remove_member(ROOT, "team", "ALICE"), "user"),
        (lambda app: app.issue_token(ROOT, "a" * 64), "user"),
        (lambda app: app.revoke_token(ROOT, "alice", ""), "token_id"),
        (lambda app: app.revoke_token(ROOT, "alice", "sy_notanid"), "token_id"),
        (lambda app: app.bootstrap_admin("Admin"), "name"),
    ],
)
async def test_invalid_names_are_refused_naming_the_field(
    identity: Identity, call: object, field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await call(identity.commands)  # type: ignore[operator]
    assert refused.value.field == field
    assert refused.value.message.startswith(f"{field}: ")
    assert await identity.store.count() == 0


async def test_missing_things_are_not_found_and_create_user_is_atomic(
    identity: Identity,
) -> None:
    app = identity.commands
    await app.create_group(ROOT, "team-a")
    with pytest.raises(NotFound, match="group 'team-z' does not exist; create it first"):
        await app.create_user(ROOT, "erin", groups=["team-a", "team-z"])
    # Nothing of the refused command was saved: no user, no membership.
    assert await identity.store.read_stream("user:erin") == []
    assert [e.event_type for e in await identity.store.read_stream("group:team-a")] == [
        "GroupCreated"
    ]
    with pytest.raises(NotFound, match="user 'erin' does not exist"):
        await app.add_member(ROOT, "team-a", "erin")
    with pytest.raises(NotFound, match="user 'erin' does not exist"):
        await app.issue_token(ROOT, "erin")
    await app.create_user(ROOT, "erin")
    with pytest.raises(AlreadyExists, match="user 'erin' exists already"):
        await app.create_user(ROOT, "erin")
    with pytest.raises(AlreadyExists, match="group 'team-a' exists already"):
        await app.create_group(ROOT, "team-a")


async def test_concurrent_commands_on_one_group_all_land(identity: Identity) -> None:
    app = identity.commands
    await app.create_group(ROOT, "crowd")
    names = [f"u{i}" for i in range(12)]
    await asyncio.gather(*(app.create_user(ROOT, n) for n in names))
    # Twelve writers on one stream: optimistic concurrency makes them retry, none lost.
    await asyncio.gather(*(app.add_member(ROOT, "crowd", n) for n in names))
    group = await identity.queries.get_group("crowd")
    assert group is not None and group.members == tuple(sorted(names))


async def test_bootstrap_admin_creates_one_admin_once(identity: Identity) -> None:
    first = await identity.commands.bootstrap_admin("admin")
    assert first.created and first.token is not None
    data = first.to_json()
    assert set(data) == {"user", "token", "token_id", "created"} and data["created"] is True
    # The runner is up, so the command waited: the token works as it returns.
    principal = await identity.queries.authenticate(first.token.token)
    assert principal.user == "admin" and principal.admin

    again = await identity.commands.bootstrap_admin("admin")
    assert again.to_json() == {"created": False, "user": "admin"}
    other = await identity.commands.bootstrap_admin("someone-else")
    assert other.to_json() == {"created": False, "user": "admin"}


async def test_concurrent_bootstraps_create_exactly_one_admin(identity: Identity) -> None:
    # Separate handler objects, as separate processes would have.
    apps = [IdentityCommands(identity.pool, identity.store, identity.queries) for _ in range(8)]
    outcomes = await asyncio.gather(
        *(app.bootstrap_admin(f"admin{i}") for i, app in enumerate(apps))
    )
    created = [o for o in outcomes if o.created]
    assert len(created) == 1
    winner = created[0].user
    assert all(o.user == winner for o in outcomes)
    users = await identity.queries.list_users(ROOT)
    assert [(u.name, u.admin, u.created_by) for u in users] == [(winner, True, "bootstrap-admin")]
    assert len(await identity.store.read_stream("bootstrap:admin")) == 1


async def test_tokens_are_never_stored_in_clear(identity: Identity) -> None:
    app = identity.commands
    await app.create_group(ROOT, "team-a")
    secrets = [(await app.bootstrap_admin("admin")).token.token]  # type: ignore[union-attr]
    created = await app.create_user(ROOT, "frank", groups=["team-a"])
    secrets.append(created.token.token)
    issued = await app.issue_token(ROOT, "frank", description="ci")
    secrets.append(issued.token)
    await app.revoke_token(ROOT, "frank", issued.token_id)

    async with identity.pool.acquire() as conn:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'keys'"
        )
        names = {r["table_name"] for r in tables}
        assert {"events", "outbox", "users", "tokens", "groups", "memberships"} <= names
        dump = []
        for name in sorted(names):
            rows = await conn.fetch(f"SELECT * FROM keys.{name}")
            dump += [json.dumps(dict(r), default=_text) for r in rows]
    text = "\n".join(dump)
    assert tokens.hash_token(created.token.token) in text  # the hash is what is kept
    for secret in secrets:
        assert secret not in text
        assert secret.removeprefix("sy_") not in text

    # Nor on the bus: every published event envelope, as other services receive it.
    async def everything_published() -> list[bytes]:
        info = await identity.svc.js.stream_info(bus.EVENTS_STREAM)
        count = await identity.store.count()
        if info.state.messages < count:
            return []
        sub = await identity.svc.js.pull_subscribe(
            "events.keys.>",
            durable=None,
            stream=bus.EVENTS_STREAM,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )
        try:
            return [m.data for m in await sub.fetch(count, timeout=5)]
        finally:
            await sub.unsubscribe()

    bodies = await wait_for(everything_published, timeout=20, message="relay lags")
    published = b"\n".join(bodies).decode()
    assert "TokenIssued" in published
    for secret in secrets:
        assert secret.removeprefix("sy_") not in published


async def test_replay_rebuilds_the_live_identity_projection(identity: Identity) -> None:
    app = identity.commands
    await app.bootstrap_admin("admin")
    for g in ("team-a", "team-b", "team-c"):
        await app.create_group(ROOT, g, description=f"group {g}")
    for i in range(6):
        created = await app.create_user(ROOT, f"user{i}", admin=i == 0, groups=["team-a"])
        extra = await app.issue_token(ROOT, f"user{i}", description=f"extra {i}")
        if i % 2:
            await app.revoke_token(ROOT, f"user{i}", created.token.token_id)
        if i % 3 == 0:
            await app.add_member(ROOT, "team-b", f"user{i}")
            await app.remove_member(ROOT, "team-a", f"user{i}")
        del extra

    check = await replay_projection(IdentityProjection(), identity.pool, swap=False)
    assert check.equal, check.differences
    assert check.events == await identity.store.count() - 1  # all but bootstrap:admin

    swapped = await replay_projection(IdentityProjection(), identity.pool)
    assert swapped.swapped and swapped.equal
    # The live projection keeps working on the swapped-in tables.
    later = await app.create_user(ROOT, "late", groups=["team-c"])
    assert (await identity.queries.authenticate(later.token.token)).groups == {"team-c"}
    assert (await replay_projection(IdentityProjection(), identity.pool, swap=False)).equal


async def test_projection_has_leader_follows_the_runner(identity: Identity) -> None:
    async def leading() -> bool:
        async with identity.pool.acquire() as conn:
            return await projection_has_leader(conn, IdentityProjection)

    await wait_for(leading, timeout=10, message="runner never took the leader lock")
    assert identity.runner.leader


def _text(value: object) -> str:
    # Outbox bodies are bytea holding the JSON envelope: read them as the text they are.
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


async def test_without_a_projection_secrets_are_still_returned_but_revocation_says_so(
    database_url: str,
) -> None:
    # No relay, no runner: nothing will ever apply the events.
    pool = await db.create_pool(database_url)
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn, SCHEMA)
            await IdentityProjection.create_tables(conn)
        store = EventStore(pool, SCHEMA)
        app = IdentityCommands(pool, store, IdentityQueries(pool), projection_wait_seconds=0.2)
        # A token is shown once: its command answers even though the token is not usable
        # yet (failing would lose it).
        created = await app.create_user(ROOT, "hank")
        assert created.token.token.startswith("sy_")
        # A revocation must hold when it answers: it says it does not, and repeating it
        # (idempotent) says so again until the projection has caught up.
        for _ in range(2):
            not_yet = r"the revocation of tok_\w+ is recorded but not in effect yet"
            with pytest.raises(Unavailable, match=not_yet):
                await app.revoke_token(ROOT, "hank", created.token.token_id)
        assert [e.event_type for e in await store.read_stream("user:hank")] == [
            "UserCreated",
            "TokenIssued",
            "TokenRevoked",
        ]
    finally:
        await pool.close()


async def test_token_checks_report_an_unreachable_store_as_unavailable(
    database_url: str,
) -> None:
    pool = await db.create_pool(database_url)
    await pool.close()
    with pytest.raises(Unavailable, match="cannot be reached; retry"):
        await IdentityQueries(pool).authenticate(tokens.new_token())
