"""The Python client against fake servicers: token metadata, error translation and
dataclass conversion."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from shipyard.client import (
    AlreadyExists,
    Client,
    ConfigError,
    Conflict,
    CreatedUser,
    DeadlineExceeded,
    Event,
    FailedPrecondition,
    GroupUsage,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Resources,
    ServerError,
    ShipyardClientError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from shipyard.client.errors import from_rpc_error

from .conftest import run


async def test_calls_carry_the_configured_token(home: Path, fake_server: Any, tokens: Any) -> None:
    client = Client(home=home)
    principal = await run(client.identity.whoami)
    assert principal.user == "admin"
    assert principal.admin is True
    assert fake_server.calls.last("WhoAmI")["authorization"] == f"Bearer {tokens['admin']}"
    client.close()


async def test_explicit_token_beats_environment_beats_config(
    home: Path, tokens: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHIPYARD_TOKEN", tokens["user"])
    assert (await run(Client(home=home).identity.whoami)).user == "ana"
    assert (await run(Client(token=tokens["admin"], home=home).identity.whoami)).user == "admin"


async def test_no_token_is_unauthenticated_with_a_hint(make_home: Any, fake_server: Any) -> None:
    client = Client(home=make_home(fake_server.address, token=None, name="anon"))
    with pytest.raises(Unauthenticated) as info:
        await run(client.identity.whoami)
    assert info.value.code == "UNAUTHENTICATED"
    assert info.value.message == "no token in the call"
    assert "SHIPYARD_TOKEN" in str(info.value)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("INVALID_ARGUMENT", InvalidArgument),
        ("NOT_FOUND", NotFound),
        ("ALREADY_EXISTS", AlreadyExists),
        ("FAILED_PRECONDITION", FailedPrecondition),
        ("RESOURCE_EXHAUSTED", QuotaExceeded),
        ("PERMISSION_DENIED", PermissionDenied),
        ("UNAUTHENTICATED", Unauthenticated),
        ("UNAVAILABLE", Unavailable),
        ("ABORTED", Conflict),
        ("INTERNAL", ServerError),
        ("UNKNOWN", ServerError),
    ],
)
async def test_status_codes_become_exceptions_with_the_server_message(
    home: Path, code: str, cls: type[ShipyardClientError]
) -> None:
    group = f"fail-{code}"
    with pytest.raises(cls) as info:
        await run(Client(home=home).quota.usage, group)
    err = info.value
    assert type(err) is cls
    assert err.code == code
    assert err.message == f"server says {code} for {group}"
    assert str(err).startswith(err.message)
    assert err.service == "quota"
    assert err.method == "GetGroupUsage"


async def test_unavailable_from_the_server_keeps_its_message_and_adds_the_hint(
    home: Path,
) -> None:
    with pytest.raises(Unavailable) as info:
        await run(Client(home=home).quota.usage, "fail-UNAVAILABLE")
    assert str(info.value) == (
        "server says UNAVAILABLE for fail-UNAVAILABLE (is Shipyard running? `shipyard up`)"
    )


async def test_quota_refusal_is_quota_exceeded(home: Path) -> None:
    with pytest.raises(QuotaExceeded, match="iris needs 8 cpu; group team-a has 3 cpu free"):
        await run(
            Client(home=home).quota.reserve,
            "team-a",
            reservation_id="r-9",
            deployment="iris",
            instance_type="cpu.small",
            instances=8,
        )


async def test_unreachable_service_names_service_address_and_shipyard_up(
    dead_home: Path,
) -> None:
    client = Client(home=dead_home)
    with pytest.raises(Unavailable) as info:
        await run(client.quota.list_usage)
    address = client.address("quota")
    assert info.value.message == f"cannot reach the quota service at {address}"
    assert "`shipyard up`" in str(info.value)
    assert "\n" not in str(info.value)


async def test_group_usage_converts_to_dataclasses(home: Path) -> None:
    usage = await run(Client(home=home).quota.usage, "team-a")
    assert isinstance(usage, GroupUsage)
    assert usage.limits == Resources(cpu=4, memory_gib=8, gpu=1, instances=4)
    assert usage.free.cpu == 3
    [reservation] = usage.reservations
    assert reservation.deployment == "iris-prod"
    assert reservation.resources.memory_gib == 2
    assert reservation.reserved_at == datetime.fromtimestamp(1_700_000_000, tz=UTC)
    data = json.loads(json.dumps(usage.to_dict()))
    assert data["limits"] == {"cpu": 4.0, "memory_gib": 8.0, "gpu": 1, "instances": 4}
    assert data["reservations"][0]["reserved_at"] == "2023-11-14T22:13:20+00:00"


async def test_set_group_quota_sends_limits(home: Path) -> None:
    usage = await run(
        Client(home=home).quota.set_group_quota,
        "team-c",
        cpu=4,
        memory_gib=8,
        gpu=0,
        instances=4,
    )
    assert usage.group == "team-c"
    assert usage.limits == Resources(cpu=4, memory_gib=8, gpu=0, instances=4)
    assert usage.reservations == []


async def test_instance_types(home: Path, tokens: Any) -> None:
    client = Client(home=home)
    created = await run(client.quota.set_instance_type, "gpu.large", cpu=8, memory_gib=32, gpu=1)
    assert created.gpu == 1
    names = [t.name for t in await run(client.quota.list_instance_types)]
    assert "gpu.large" in names
    with pytest.raises(PermissionDenied, match="SetInstanceType is for admins"):
        await run(
            Client(token=tokens["user"], home=home).quota.set_instance_type,
            "x",
            cpu=1,
            memory_gib=1,
        )


async def test_release_returns_whether_something_was_released(home: Path) -> None:
    client = Client(home=home)
    assert await run(client.quota.release, "team-a", "r-1") is True
    assert await run(client.quota.release, "team-a", "r-0") is False


async def test_identity_round_trip(home: Path) -> None:
    identity = Client(home=home).identity
    created = await run(identity.create_user, "bo", groups=["team-a"])
    assert isinstance(created, CreatedUser)
    assert created.token == "sy_bo_onceonly"
    assert created.user.groups == ["team-a"]
    assert created.to_dict()["user"]["name"] == "bo"
    with pytest.raises(AlreadyExists, match="user bo exists already"):
        await run(identity.create_user, "bo")
    with pytest.raises(FailedPrecondition):
        await run(identity.create_user, "cy", groups=["ghosts"])
    assert "bo" in [u.name for u in await run(identity.list_users)]
    group = await run(identity.create_group, "team-z", description="Z")
    assert group.description == "Z"
    assert (await run(identity.add_member, "team-z", "bo")).members == ["bo"]
    assert (await run(identity.remove_member, "team-z", "bo")).members == []
    assert "team-z" in [g.name for g in await run(identity.list_groups)]
    assert (await run(identity.issue_token, "bo")).token_id == "tok-2"
    await run(identity.revoke_token, "bo", "tok-1")
    with pytest.raises(NotFound):
        await run(identity.revoke_token, "bo", "tok-404")
    assert (await run(identity.authenticate, "sy_ana_secret")).user == "ana"


async def test_events_pages_and_decodes_payloads(home: Path) -> None:
    events = Client(home=home).events("quota")
    page = await run(events.list_events, limit=2)
    assert [e.position for e in page.events] == [1, 2]
    assert page.last_position == 2
    first = page.events[0]
    assert isinstance(first, Event)
    assert first.payload == {"group": "team-a", "cpu": 1}
    assert first.metadata == {"actor": "admin"}
    everything = await run(lambda: list(events.iter_events(page_size=2)))
    assert [e.position for e in everything] == [1, 2, 3, 4, 5]
    only_a = await run(lambda: list(events.iter_events(stream_id="team-a")))
    assert {e.stream_id for e in only_a} == {"team-a"}


async def test_lag_and_replay(home: Path) -> None:
    events = Client(home=home).events("keys")
    lag = await run(events.lag)
    assert [c.name for c in lag] == ["usage", "outbox-relay"]
    assert lag[0].pending == 3
    checked = await run(events.replay, "drifted", check=True)
    assert (checked.equal, checked.swapped) == (False, False)
    assert checked.differences == ["group team-a: cpu 4 != 5"]
    swapped = await run(events.replay, "usage")
    assert (swapped.equal, swapped.swapped, swapped.events) == (True, True, 1200)


def test_unknown_service_is_a_config_error(home: Path) -> None:
    with pytest.raises(ConfigError, match="unknown service 'nope'"):
        Client(home=home).events("nope")


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the client config"):
        Client(home=tmp_path)


def test_repr_never_shows_the_token(home: Path, tokens: Any) -> None:
    assert tokens["admin"] not in repr(Client(home=home))


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_deadline_exceeded_is_a_kind_of_unavailable() -> None:
    err = from_rpc_error(
        _RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
        service="quota",
        address="127.0.0.1:1",
        method="Reserve",
        timeout=30,
    )
    assert isinstance(err, DeadlineExceeded)
    assert isinstance(err, Unavailable)
    assert err.message == "the quota service at 127.0.0.1:1 did not answer Reserve within 30s"


def test_grpc_connection_noise_is_replaced() -> None:
    noise = (
        "failed to connect to all addresses; last error: UNKNOWN: "
        "ipv4:127.0.0.1:9: Failed to connect to remote host: Connection refused"
    )
    err = from_rpc_error(
        _RpcError(grpc.StatusCode.UNAVAILABLE, noise),
        service="keys",
        address="127.0.0.1:9",
        method="WhoAmI",
    )
    assert err.message == "cannot reach the keys service at 127.0.0.1:9"


def test_unimplemented_says_which_server_lacks_the_call() -> None:
    err = from_rpc_error(
        _RpcError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"),
        service="scheduler",
        address="127.0.0.1:50054",
        method="GetLag",
    )
    assert isinstance(err, Unimplemented)
    assert "does not implement GetLag" in str(err)


def test_multiline_messages_print_on_one_line() -> None:
    err = NotFound("group x\nnot found")
    assert str(err) == "group x not found"
    assert err.to_dict()["code"] == "NOT_FOUND"
