"""``client.client_keys`` and ``shipyard keys`` against a stand-in ClientKeyService
(grpc.aio, keys in a dict, every request recorded). What is tested here is the client's
own work: requests, conversions, errors and the CLI's output. The real keys service is
tested in services/keys and end to end elsewhere."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from shipyard.cli.keys_cmds import curl_examples
from shipyard.client import (
    AlreadyExists,
    Client,
    ClientKeyView,
    CreatedClientKey,
    InvalidArgument,
    NotFound,
)
from shipyard.keys.v1 import client_keys_pb2 as pb
from shipyard.keys.v1 import client_keys_pb2_grpc as pb_grpc

from .conftest import (
    assert_json_output,
    assert_one_line_error,
    assert_text_output,
    run,
    serving,
    shipyard,
    write_config,
)

TOKEN = "sy_ana_secret"
SECRET = "sk_" + "Ab9_-" * 8 + "xyz"
GATEWAY = "http://gw.example:8080"
T0 = 1_700_000_000
NOT_FOUND = "deployment 'theirs' does not exist; see `shipyard deploy list`"


@dataclass
class FakeClientKeys(pb_grpc.ClientKeyServiceServicer):
    """Keys of the deployments ana's group owns (``iris-prod``, ``wine``); any other
    deployment is NOT_FOUND, as another group's would be."""

    requests: list[tuple[str, Any]] = field(default_factory=list)
    keys: list[pb.ClientKey] = field(default_factory=list)
    counter: int = 0

    def reset(self) -> None:
        self.requests.clear()
        self.counter = 0
        self.keys = [
            pb.ClientKey(
                deployment="iris-prod",
                group="team-a",
                client="batch",
                key_id="ck_00000001",
                created_by="ana",
                created_at=Timestamp(seconds=T0),
                last_used_at=Timestamp(seconds=T0 + 120),
            ),
            pb.ClientKey(
                deployment="iris-prod",
                group="team-a",
                client="old",
                key_id="ck_00000002",
                created_by="admin",
                created_at=Timestamp(seconds=T0 + 10),
                revoked=True,
                revoked_at=Timestamp(seconds=T0 + 3600),
                revoked_by="ana",
            ),
        ]

    def sent(self, method: str) -> Any:
        for name, request in reversed(self.requests):
            if name == method:
                return request
        raise AssertionError(f"{method} was not called")

    async def _record(self, method: str, request: Any, context: Any) -> None:
        copy = type(request)()
        copy.CopyFrom(request)
        self.requests.append((method, copy))
        metadata = {k: v for k, v in context.invocation_metadata() or ()}
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
        if not request.deployment or request.deployment.upper() == request.deployment:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"deployment: {request.deployment!r} is not a valid deployment name",
            )
        if request.deployment not in ("iris-prod", "wine"):
            await context.abort(grpc.StatusCode.NOT_FOUND, NOT_FOUND)

    async def CreateClientKey(self, request: Any, context: Any) -> pb.CreatedClientKey:
        await self._record("CreateClientKey", request, context)
        for key in self.keys:
            if (key.deployment, key.client, key.revoked) == (
                request.deployment,
                request.client,
                False,
            ):
                await context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"client {request.client!r} of deployment {request.deployment!r} has an "
                    f"active key ({key.key_id}) already; revoke it first",
                )
        self.counter += 1
        key = pb.ClientKey(
            deployment=request.deployment,
            group="team-a",
            client=request.client,
            key_id=f"ck_1000000{self.counter}",
            created_by="ana",
            created_at=Timestamp(seconds=T0 + 7200),
        )
        self.keys.append(key)
        return pb.CreatedClientKey(key=key, secret=SECRET)

    async def ListClientKeys(self, request: Any, context: Any) -> pb.ListClientKeysResponse:
        await self._record("ListClientKeys", request, context)
        return pb.ListClientKeysResponse(
            keys=[
                k
                for k in self.keys
                if k.deployment == request.deployment and (request.include_revoked or not k.revoked)
            ]
        )

    async def RevokeClientKey(self, request: Any, context: Any) -> pb.ClientKey:
        await self._record("RevokeClientKey", request, context)
        for key in reversed(self.keys):
            if (key.deployment, key.client) == (request.deployment, request.client):
                if not key.revoked:
                    key.revoked = True
                    key.revoked_at.CopyFrom(Timestamp(seconds=T0 + 9000))
                    key.revoked_by = "ana"
                return key
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"deployment {request.deployment!r} has no client key for client "
            f"{request.client!r}; see `shipyard keys list {request.deployment}`",
        )
        raise AssertionError("unreachable")


@dataclass
class Fake:
    servicer: FakeClientKeys
    address: str
    home: Path


@pytest.fixture(scope="module")
async def keys_server() -> AsyncIterator[tuple[FakeClientKeys, str]]:
    servicer = FakeClientKeys()
    async with serving((pb_grpc.add_ClientKeyServiceServicer_to_server, servicer)) as address:
        yield servicer, address


@pytest.fixture
def fake(keys_server: tuple[FakeClientKeys, str], tmp_path: Path) -> Fake:
    servicer, address = keys_server
    servicer.reset()
    home = write_config(tmp_path / "home", TOKEN, {"keys": address, "gateway_http": GATEWAY})
    return Fake(servicer, address, home)


# The client.


async def test_create_sends_the_request_and_keeps_the_secret_out_of_repr(fake: Fake) -> None:
    client = Client(home=fake.home)
    created = await run(client.client_keys.create, "iris-prod", "shop")
    assert isinstance(created, CreatedClientKey) and isinstance(created.key, ClientKeyView)
    sent = fake.servicer.sent("CreateClientKey")
    assert (sent.deployment, sent.client) == ("iris-prod", "shop")
    assert created.secret == SECRET and SECRET not in repr(created)
    assert created.to_dict()["secret"] == SECRET
    key = created.key
    assert (key.deployment, key.group, key.client, key.key_id, key.created_by) == (
        "iris-prod",
        "team-a",
        "shop",
        "ck_10000001",
        "ana",
    )
    assert key.created_at is not None and key.created_at.timestamp() == T0 + 7200
    assert key.last_used_at is None and key.revoked_at is None and not key.revoked
    client.close()


async def test_list_and_revoke_convert(fake: Fake) -> None:
    client = Client(home=fake.home)
    active = await run(client.client_keys.list, "iris-prod")
    assert fake.servicer.sent("ListClientKeys").include_revoked is False
    assert [k.client for k in active] == ["batch"]
    assert active[0].last_used_at is not None
    assert active[0].last_used_at.timestamp() == T0 + 120
    every = await run(client.client_keys.list, "iris-prod", include_revoked=True)
    assert fake.servicer.sent("ListClientKeys").include_revoked is True
    old = every[1]
    assert (old.client, old.revoked, old.revoked_by) == ("old", True, "ana")
    assert old.revoked_at is not None and old.revoked_at.timestamp() == T0 + 3600

    revoked = await run(client.client_keys.revoke, "iris-prod", "batch")
    sent = fake.servicer.sent("RevokeClientKey")
    assert (sent.deployment, sent.client) == ("iris-prod", "batch")
    assert (revoked.key_id, revoked.revoked, revoked.revoked_by) == ("ck_00000001", True, "ana")
    client.close()


async def test_refusals_become_client_errors(fake: Fake) -> None:
    client = Client(home=fake.home)
    with pytest.raises(AlreadyExists, match="revoke it first"):
        await run(client.client_keys.create, "iris-prod", "batch")
    with pytest.raises(NotFound, match="deployment 'theirs' does not exist"):
        await run(client.client_keys.list, "theirs")
    with pytest.raises(NotFound, match="has no client key for client 'ghost'"):
        await run(client.client_keys.revoke, "iris-prod", "ghost")
    with pytest.raises(InvalidArgument, match="deployment: "):
        await run(client.client_keys.create, "IRIS", "shop")
    client.close()


# The CLI.


def test_curl_examples_are_ready_to_paste() -> None:
    url = f"{GATEWAY}/deployments/d/predict"
    assert curl_examples(url, "shop", SECRET) == {
        "basic": f"curl -u shop:{SECRET} {url} -d @payload.json",
        "header": f'curl -H "X-API-Key: {SECRET}" {url} -d @payload.json',
    }
    # Anything a shell would misread is quoted.
    odd = curl_examples("http://gw/deployments/d/predict?x=1&y=2", "shop", "sk_a$b")
    assert (
        odd["basic"]
        == "curl -u 'shop:sk_a$b' 'http://gw/deployments/d/predict?x=1&y=2' -d @payload.json"
    )
    assert odd["header"].startswith("curl -H 'X-API-Key: sk_a$b' ")


async def test_cli_create_prints_the_secret_once_with_examples(fake: Fake) -> None:
    result = await shipyard(fake.home, "keys", "create", "iris-prod", "--client", "shop")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count(SECRET) == 3  # the secret field and the two examples
    lines = out.splitlines()
    assert f"secret:     {SECRET}" in lines
    assert "key id:     ck_10000001" in lines
    url = f"{GATEWAY}/deployments/iris-prod/predict"
    assert f"  curl -u shop:{SECRET} {url} -d @payload.json" in lines
    assert f'  curl -H "X-API-Key: {SECRET}" {url} -d @payload.json' in lines
    assert result.stderr == (
        "warning: this secret is shown only once and cannot be retrieved later; store it now\n"
    )


async def test_cli_create_uses_the_configured_gateway(fake: Fake) -> None:
    env = {"SHIPYARD_GATEWAY_URL": "https://models.example.com/"}
    result = await shipyard(fake.home, "keys", "create", "wine", "--client", "shop", env=env)
    assert result.exit_code == 0, result.output
    assert "https://models.example.com/deployments/wine/predict -d @payload.json" in result.stdout


async def test_cli_create_json(fake: Fake) -> None:
    data = await assert_json_output(fake.home, "keys", "create", "iris-prod", "--client", "shop")
    assert data["secret"] == SECRET
    assert data["key"]["key_id"] == "ck_10000001" and data["key"]["client"] == "shop"
    assert data["url"] == f"{GATEWAY}/deployments/iris-prod/predict"
    assert data["examples"]["basic"].startswith(f"curl -u shop:{SECRET} ")


async def test_cli_list_table(fake: Fake) -> None:
    result = await shipyard(fake.home, "keys", "list", "iris-prod")
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["CLIENT", "KEY_ID", "CREATED", "CREATED_BY", "LAST_USED"]
    assert rows[1][:2] == ["batch", "ck_00000001"] and len(rows) == 2
    assert "2023-11-14 22:15:20Z" in result.stdout  # last used, T0 + 120 s
    every = await shipyard(fake.home, "keys", "list", "iris-prod", "--all")
    rows = [line.split() for line in every.stdout.splitlines()]
    assert rows[0][-1] == "REVOKED"
    assert rows[1][-1] == "-" and rows[2][0] == "old"
    assert rows[2][-2:] == ["2023-11-14", "23:13:20Z"]  # revoked at T0 + 1 h
    assert " - " in every.stdout.splitlines()[2]  # never used

    empty = await shipyard(fake.home, "keys", "list", "wine")
    assert empty.stdout == "no active client keys on wine (--all shows revoked ones)\n"
    none = await shipyard(fake.home, "keys", "list", "wine", "--all")
    assert none.stdout == "no client keys on wine\n"


async def test_cli_revoke(fake: Fake) -> None:
    result = await shipyard(fake.home, "keys", "revoke", "iris-prod", "batch")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "revoked client key ck_00000001 of client batch on iris-prod "
        "(the gateway refuses it within a second)\n"
    )
    data = await assert_json_output(fake.home, "keys", "revoke", "iris-prod", "batch")
    assert data["revoked"] is True and data["key_id"] == "ck_00000001"


JSON_COMMANDS = [
    ["keys", "create", "wine", "--client", "json"],
    ["keys", "list", "iris-prod"],
    ["keys", "list", "iris-prod", "--all"],
    ["keys", "revoke", "iris-prod", "old"],
]


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=lambda a: " ".join(a[:3]))
async def test_json_output_is_valid_json(fake: Fake, args: list[str]) -> None:
    await assert_json_output(fake.home, *args)


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=lambda a: " ".join(a[:3]))
async def test_text_output_works(fake: Fake, args: list[str]) -> None:
    await assert_text_output(fake.home, *args)


async def test_failures_are_one_line(fake: Fake) -> None:
    for args in (["list", "theirs"], ["create", "theirs", "--client", "x"]):
        line = assert_one_line_error(await shipyard(fake.home, "keys", *args))
        assert line == f"error: {NOT_FOUND}"
    line = assert_one_line_error(
        await shipyard(fake.home, "keys", "create", "iris-prod", "--client", "batch")
    )
    assert "has an active key (ck_00000001) already; revoke it first" in line
    line = assert_one_line_error(await shipyard(fake.home, "keys", "revoke", "iris-prod", "x"))
    assert "has no client key for client 'x'" in line
    # Failures with --json are the same one line on stderr, nothing on stdout.
    failed = await shipyard(fake.home, "keys", "list", "theirs", "--json")
    assert assert_one_line_error(failed) == f"error: {NOT_FOUND}" and failed.stdout == ""
    usage = assert_one_line_error(await shipyard(fake.home, "keys", "create", "iris-prod"), 2)
    assert "--client" in usage


async def test_unreachable_keys_service_is_one_line(tmp_path: Path, unused_port: int) -> None:
    write_config(tmp_path, TOKEN, {"keys": f"127.0.0.1:{unused_port}"})
    line = assert_one_line_error(await shipyard(tmp_path, "keys", "list", "iris-prod"))
    assert f"cannot reach the keys service at 127.0.0.1:{unused_port}" in line


async def test_help_lists_the_keys_commands(fake: Fake) -> None:
    result = await shipyard(fake.home, "keys", "--help")
    for verb in ("create", "list", "revoke"):
        assert verb in result.stdout
    assert "keys" in (await shipyard(fake.home, "--help")).stdout
    created = await shipyard(fake.home, "keys", "create", "--help")
    assert "--client NAME" in created.stdout and "--json" in created.stdout
    data = json.loads((await shipyard(fake.home, "keys", "list", "wine", "--json")).stdout)
    assert data == []
