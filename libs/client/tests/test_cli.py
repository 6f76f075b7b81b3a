"""The ``shipyard`` CLI through click's CliRunner against the fake servicers."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import click
import pytest

from shipyard.cli import main as cli_main
from shipyard.client.events import EVENT_SOURCED_SERVICES

from .conftest import (
    assert_json_output,
    assert_one_line_error,
    assert_text_output,
    shipyard,
    write_config,
)

JSON_COMMANDS = [
    ["quota", "show", "team-a"],
    ["quota", "show"],
    ["quota", "set", "team-a", "--cpu", "4", "--memory", "8", "--gpu", "0", "--instances", "4"],
    ["instance-types", "list"],
    ["instance-types", "set", "cpu.medium", "--cpu", "2", "--memory", "4"],
    ["users", "create", "dee", "--group", "team-a"],
    ["users", "list"],
    ["users", "whoami"],
    ["users", "issue-token", "dee"],
    ["users", "revoke-token", "dee", "tok-1"],
    ["groups", "create", "team-j", "--description", "J"],
    ["groups", "add-member", "team-j", "dee"],
    ["groups", "remove-member", "team-j", "dee"],
    ["groups", "list"],
    ["events", "list", "--service", "quota", "--limit", "2"],
    ["events", "lag"],
    ["events", "replay", "usage", "--service", "quota"],
]


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=lambda a: " ".join(a[:2]))
async def test_json_output_is_valid_json(home: Path, args: list[str]) -> None:
    await assert_json_output(home, *args)


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=lambda a: " ".join(a[:2]))
async def test_text_output_works(home: Path, args: list[str]) -> None:
    if args[:2] == ["users", "create"]:
        args = [*args[:2], "dee-text", *args[3:]]
    await assert_text_output(home, *args)


async def test_quota_show_prints_limits_used_free(home: Path) -> None:
    result = await shipyard(home, "quota", "show", "team-a")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["group:", "team-a"]
    assert ["RESOURCE", "LIMIT", "USED", "FREE"] in [line.split() for line in lines]
    assert ["cpu", "4", "1", "3"] in [line.split() for line in lines]
    assert any("iris-prod" in line for line in lines)


async def test_quota_show_all_groups(home: Path) -> None:
    result = await shipyard(home, "quota", "show", "--json")
    assert [g["group"] for g in json.loads(result.stdout)] == ["team-a", "team-b"]
    text = await shipyard(home, "quota", "show")
    assert "1/4 (free 3)" in text.stdout


async def test_unreachable_server_is_one_line_pointing_at_shipyard_up(dead_home: Path) -> None:
    for args in (["quota", "show"], ["users", "whoami", "--json"], ["events", "lag"]):
        line = assert_one_line_error(await shipyard(dead_home, *args))
        assert "cannot reach the" in line
        assert "`shipyard up`" in line


async def test_server_message_reaches_the_user_verbatim(home: Path) -> None:
    result = await shipyard(
        home, "quota", "set", "nope", "--cpu", "1", "--memory", "1", "--instances", "1"
    )
    line = assert_one_line_error(result)
    assert line == "error: group nope does not exist (create it with `shipyard groups create nope`)"
    line = assert_one_line_error(await shipyard(home, "quota", "show", "fail-INTERNAL"))
    assert line == "error: server says INTERNAL for fail-INTERNAL"


async def test_permission_denied_with_a_user_token(home: Path, tokens: Any) -> None:
    result = await shipyard(home, "--token", tokens["user"], "users", "list")
    assert assert_one_line_error(result) == "error: ListUsers is for admins; ask an admin"
    whoami = await shipyard(home, "--token", tokens["user"], "users", "whoami", "--json")
    assert json.loads(whoami.stdout)["user"] == "ana"


async def test_users_create_prints_the_token_once_with_a_warning(home: Path) -> None:
    result = await shipyard(home, "users", "create", "eve", "--group", "team-a")
    assert result.exit_code == 0
    token = "sy_eve_onceonly"
    assert result.stdout.count(token) == 1
    assert token not in result.stderr
    assert "shown only once" in result.stderr
    as_json = await shipyard(home, "users", "create", "fay", "--admin", "--json")
    data = json.loads(as_json.stdout)
    assert data["token"] == "sy_fay_onceonly"
    assert data["user"]["admin"] is True
    assert as_json.stdout.count("sy_fay_onceonly") == 1


async def test_users_create_twice_is_already_exists(home: Path) -> None:
    await shipyard(home, "users", "create", "gus")
    line = assert_one_line_error(await shipyard(home, "users", "create", "gus"))
    assert line == "error: user gus exists already"


@pytest.mark.parametrize(
    "args",
    [
        ["quota", "set", "team-a", "--cpu", "1"],
        ["quota", "set", "team-a", "--cpu", "-1", "--memory", "1", "--instances", "1"],
        ["quota", "nonsense"],
        ["events", "list", "--service", "nowhere"],
        ["events", "replay", "usage"],
        ["events", "tail", "--aggregate", "a.b"],
        ["users", "create"],
        ["--bogus"],
    ],
)
async def test_bad_usage_exits_2_with_one_line(home: Path, args: list[str]) -> None:
    assert_one_line_error(await shipyard(home, *args), exit_code=2)


async def test_help_exits_0(home: Path) -> None:
    result = await shipyard(home, "--help")
    assert result.exit_code == 0
    for noun in ("quota", "instance-types", "users", "groups", "events"):
        assert noun in result.stdout


async def test_replay_check_fails_on_drift(home: Path) -> None:
    result = await shipyard(home, "events", "replay", "drifted", "--service", "quota", "--check")
    line = assert_one_line_error(result)
    assert "differs from the live tables" in line
    assert "equal:" in result.stdout
    assert "cpu 4 != 5" in result.stdout
    ok = await shipyard(home, "events", "replay", "usage", "--service", "quota", "--check")
    assert ok.exit_code == 0
    assert "swapped:" in ok.stdout


async def test_replay_unknown_projection(home: Path) -> None:
    result = await shipyard(home, "events", "replay", "unknown", "--service", "quota")
    assert assert_one_line_error(result) == (
        "error: projection unknown does not exist (known: usage, catalog)"
    )


async def test_events_list_pages(home: Path) -> None:
    result = await shipyard(home, "events", "list", "--limit", "2", "--json")
    data = json.loads(result.stdout)
    assert data["service"] == "quota"
    assert data["last_position"] == 2
    assert data["events"][0]["payload"] == {"group": "team-a", "cpu": 1}
    text = await shipyard(home, "events", "list", "--limit", "2")
    assert "--after 2" in text.stderr
    rest = await shipyard(home, "events", "list", "--after", "2", "--json")
    assert [e["position"] for e in json.loads(rest.stdout)["events"]] == [3, 4, 5]


async def test_lag_covers_every_event_sourced_service(home: Path) -> None:
    result = await shipyard(home, "events", "lag", "--json")
    # the fake serves two consumers per service, whichever service is asked
    assert len(json.loads(result.stdout)) == 2 * len(EVENT_SOURCED_SERVICES)


async def test_tail_without_nats_is_one_line(unused_port: int) -> None:
    result = await shipyard(None, "events", "tail", "--nats-url", f"nats://127.0.0.1:{unused_port}")
    line = assert_one_line_error(result)
    assert f"cannot reach NATS at nats://127.0.0.1:{unused_port}" in line
    assert "`shipyard up`" in line


async def test_bad_config_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{broken")
    line = assert_one_line_error(await shipyard(tmp_path, "users", "whoami"))
    assert "cannot read the client config" in line


def test_platform_commands_register_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("shipyard.cli.platform_cmds")

    def register(group: click.Group) -> None:
        @group.command("up")
        def up() -> None:
            click.echo("up!")

    module.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shipyard.cli.platform_cmds", module)
    group = click.Group("shipyard")
    cli_main._register_platform_commands(group)
    assert "up" in group.commands


def test_missing_platform_module_is_silent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_main, "PLATFORM_MODULE", "shipyard.cli.no_such_module_here")
    group = click.Group("shipyard")
    cli_main._register_platform_commands(group)
    assert group.commands == {}
    assert capsys.readouterr().err == ""


async def test_lag_shows_reachable_services_and_fails_for_the_rest(
    tmp_path: Path, fake_server: Any, unused_port: int, tokens: Any
) -> None:
    endpoints = {"quota": fake_server.address, "keys": f"127.0.0.1:{unused_port}"}
    write_config(tmp_path, tokens["admin"], endpoints)
    result = await shipyard(tmp_path, "events", "lag", "--json")
    line = assert_one_line_error(result)
    assert "cannot reach the keys service" in line
    assert {c["service"] for c in json.loads(result.stdout)} == {"quota"}
