"""Fixtures for the end-to-end tests: a whole platform, started as a user starts it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.client.config import DEFAULT_PORTS
from shipyard_core.embedded import free_port
from shipyard_platform import down, up

SHIPYARD = str(Path(sys.executable).with_name("shipyard"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running platform on free ports, for the whole module."""
    saved = dict(os.environ)
    # Every port free, the services' from the one table of them: a port left at its
    # default would reach whatever else on this machine listens there.
    ports = {f"SHIPYARD_{name.upper()}_PORT": str(free_port()) for name in DEFAULT_PORTS}
    os.environ.update(
        {
            **ports,
            "SHIPYARD_NATS_PORT": str(free_port()),
            "SHIPYARD_PG_PORT": str(free_port()),
            # The gateway reports request metrics every second instead of every 10.
            "SHIPYARD_METRICS_INTERVAL_SECONDS": "1",
            "SHIPYARD_GATEWAY_HTTP_PORT": str(free_port()),
            "SHIPYARD_UP_TIMEOUT": "90",
        }
    )
    for name in ("SHIPYARD_NATS_URL", "SHIPYARD_DATABASE_URL", "SHIPYARD_TOKEN", "SHIPYARD_HOME"):
        os.environ.pop(name, None)
    # Not under pytest's tmp root, which is private to root (PostgreSQL runs as its own user).
    path = Path(tempfile.mkdtemp(prefix="shipyard-e2e-"))
    try:
        up(path)
        yield path
    finally:
        down(path)
        shutil.rmtree(path, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)


def admin_token(home: Path) -> str:
    return str(json.loads((home / "config.json").read_text())["token"])


def sy(home: Path, *args: str, token: str | None = None, ok: bool = True) -> Any:
    """Runs the CLI; returns parsed --json output (or the failure's stderr line)."""
    env = {k: v for k, v in os.environ.items() if k != "SHIPYARD_TOKEN"}
    cmd = [SHIPYARD, "--home", str(home)]
    if token is not None:
        cmd += ["--token", token]
    proc = subprocess.run(
        [*cmd, *args, "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    if ok:
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        return json.loads(proc.stdout) if proc.stdout.strip() else None
    assert proc.returncode != 0, f"{args} should have failed: {proc.stdout}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def two_teams(home: Path, teams: tuple[str, str], users: tuple[str, str]) -> tuple[str, str]:
    """What an admin sets up first: the instance type ``cpu.small``, two groups with one
    member each, and a quota for the first group. Returns the two members' tokens."""
    sy(home, "instance-types", "set", "cpu.small", "--cpu", "0.5", "--memory", "1")
    for team in teams:
        sy(home, "groups", "create", team)
    tokens = [
        sy(home, "users", "create", user, "--group", team)["token"]
        for user, team in zip(users, teams, strict=True)
    ]
    sy(home, "quota", "set", teams[0], "--cpu", "2", "--memory", "4", "--instances", "4")
    return tokens[0], tokens[1]
