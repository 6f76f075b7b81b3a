"""End-to-end tests of the embedded platform: real NATS, PostgreSQL and service processes.

Ports come from the environment (``SHIPYARD_NATS_PORT``, ``SHIPYARD_PG_PORT``,
``SHIPYARD_<SERVICE>_PORT``), set to free ports here so the tests never touch the default
ports of a developer's running Shipyard. Most tests run a stand-in service
(``fake_service.py``); ``test_real_services`` runs the real service table, as much of it
as can run with ``python -m`` already.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import StreamConfig

from shipyard_core.embedded import free_port
from shipyard_platform import (
    SERVICES,
    ComponentStatus,
    PlatformError,
    ServiceSpec,
    default_services,
    down,
    read_state,
    status,
    up,
)
from shipyard_platform.supervisor import pid_alive, port_was_taken
from shipyard_testing import wait_for_sync

FAKE_SERVICE = Path(__file__).with_name("fake_service.py")


@pytest.fixture
def home(embedded_tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A Shipyard home on free ports; whatever runs there is stopped afterwards."""
    monkeypatch.setenv("SHIPYARD_NATS_PORT", str(free_port()))
    monkeypatch.setenv("SHIPYARD_PG_PORT", str(free_port()))
    monkeypatch.setenv("SHIPYARD_UP_TIMEOUT", "60")
    for name in ("SHIPYARD_NATS_URL", "SHIPYARD_DATABASE_URL", "SHIPYARD_TOKEN", "SHIPYARD_HOME"):
        monkeypatch.delenv(name, raising=False)
    path = embedded_tmp_path / "home"
    try:
        yield path
    finally:
        down(path)


def fake(name: str = "fake", argv: tuple[str, ...] | None = None) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        module="fake_service",
        port=free_port(),
        bootstrap_admin=True,
        argv=argv or (sys.executable, str(FAKE_SERVICE)),
    )


def by_name(statuses: list[ComponentStatus]) -> dict[str, ComponentStatus]:
    return {s.name: s for s in statuses}


def all_healthy(home: Path) -> bool:
    return all(s.healthy for s in status(home))


async def write_data(home: Path) -> None:
    state = read_state(home)
    assert state is not None
    conn = await asyncpg.connect(state["database_url"])
    try:
        await conn.execute("CREATE TABLE kept (note text)")
        await conn.execute("INSERT INTO kept VALUES ('survives')")
    finally:
        await conn.close()
    nc = await nats.connect(state["nats_url"])
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="KEPT", subjects=["kept.>"]))
        await js.publish("kept.1", b"survives")
    finally:
        await nc.close()


async def read_data(home: Path) -> tuple[list[str], bytes | None]:
    state = read_state(home)
    assert state is not None
    conn = await asyncpg.connect(state["database_url"])
    try:
        rows = [r["note"] for r in await conn.fetch("SELECT note FROM kept")]
    finally:
        await conn.close()
    nc = await nats.connect(state["nats_url"])
    try:
        msg = await nc.jetstream().get_msg("KEPT", 1)
    finally:
        await nc.close()
    return rows, msg.data


async def test_up_status_down_up_keeps_data(home: Path) -> None:
    service = fake()
    started = time.monotonic()
    up(home, services=[service])
    first_up = time.monotonic() - started

    statuses = by_name(status(home))
    assert list(statuses) == ["supervisor", "nats", "postgres", "fake"]
    assert all(s.healthy for s in statuses.values()), statuses
    assert statuses["fake"].address == f"127.0.0.1:{service.port}"
    assert statuses["nats"].address == f"nats://127.0.0.1:{os.environ['SHIPYARD_NATS_PORT']}"
    for component in ("nats", "postgres", "fake", "supervisor"):
        assert (home / "logs" / f"{component}.log").exists()

    # The admin was bootstrapped and the client config written.
    config = json.loads((home / "config.json").read_text())
    assert config["token"].startswith("sy_")
    assert config["endpoints"] == {"fake": f"127.0.0.1:{service.port}"}
    assert (home / "config.json").stat().st_mode & 0o077 == 0

    await write_data(home)

    # up twice is harmless: same processes.
    pids = {s.name: s.pid for s in statuses.values()}
    up(home, services=[service])
    assert {s.name: s.pid for s in status(home)} == pids

    down(home)
    after = by_name(status(home))
    assert not any(s.healthy for s in after.values())
    for name, pid in pids.items():
        assert pid is not None
        assert not pid_alive(pid), name
    down(home)  # idempotent

    started = time.monotonic()
    up(home, services=[service])
    second_up = time.monotonic() - started
    assert all_healthy(home)
    assert await read_data(home) == (["survives"], b"survives")
    # No second admin: the first token is kept.
    assert json.loads((home / "config.json").read_text())["token"] == config["token"]
    print(f"first up {first_up:.2f}s, second up {second_up:.2f}s")


def test_crashed_service_and_nats_are_restarted(home: Path) -> None:
    up(home, services=[fake()])
    before = by_name(status(home))

    os.kill(before["fake"].pid or 0, signal.SIGKILL)

    def fake_back() -> bool:
        now = by_name(status(home))["fake"]
        return now.healthy and now.pid != before["fake"].pid and now.restarts == 1

    wait_for_sync(fake_back, timeout=30, message="fake service restarted")

    os.killpg(before["nats"].pid or 0, signal.SIGKILL)

    def nats_back() -> bool:
        now = by_name(status(home))["nats"]
        return now.healthy and now.pid != before["nats"].pid

    wait_for_sync(nats_back, timeout=30, message="nats restarted")
    assert all_healthy(home)


def test_killed_supervisor_is_cleaned_up_by_down_and_up(home: Path) -> None:
    up(home, services=[fake()])
    before = by_name(status(home))
    os.kill(before["supervisor"].pid or 0, signal.SIGKILL)
    wait_for_sync(
        lambda: not by_name(status(home))["supervisor"].healthy, message="supervisor gone"
    )
    # Its children are orphans now; a new up takes over (stops them, starts fresh ones).
    up(home, services=[fake()])
    after = by_name(status(home))
    assert all(s.healthy for s in after.values()), after
    assert after["postgres"].pid != before["postgres"].pid
    down(home)
    for s in before.values():
        assert s.pid is not None
        assert not pid_alive(s.pid), s


def test_failing_service_fails_up_with_its_log(home: Path) -> None:
    broken = fake(
        "broken", argv=(sys.executable, "-c", "import sys; print('boom: no config'); sys.exit(2)")
    )
    with pytest.raises(PlatformError, match="boom: no config"):
        up(home, services=[broken])
    state = read_state(home)
    assert state is not None
    assert state["phase"] == "failed"
    # Nothing is left running after a failed up.
    wait_for_sync(lambda: not any(s.pid for s in status(home)), message="all stopped")


def test_a_port_another_program_serves_fails_up(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another installation's service already answers gRPC health on the port. Counting
    # that answer as ours made `up` succeed while our service crash-looped, and callers
    # reached the other installation.
    service = fake()
    squatter = subprocess.Popen(
        [sys.executable, str(FAKE_SERVICE)],
        env={**os.environ, "SHIPYARD_GRPC_PORT": str(service.port)},
        stdout=subprocess.PIPE,
    )
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline() == b"fake service serving\n"
        monkeypatch.setenv("SHIPYARD_UP_TIMEOUT", "8")
        with pytest.raises(PlatformError, match=f"not listening on port {service.port}"):
            up(home, services=[service])
    finally:
        squatter.terminate()
        squatter.wait(10)


def test_external_nats_and_postgres_are_used_not_started(
    home: Path, monkeypatch: pytest.MonkeyPatch, nats_url: str, database_url: str
) -> None:
    monkeypatch.setenv("SHIPYARD_NATS_URL", nats_url)
    monkeypatch.setenv("SHIPYARD_DATABASE_URL", database_url)
    up(home, services=[fake()])
    statuses = by_name(status(home))
    assert all(s.healthy for s in statuses.values()), statuses
    assert statuses["nats"].pid is None and statuses["nats"].address == nats_url
    assert statuses["postgres"].detail.startswith("external")
    assert not (home / "postgres").exists()


def test_service_table_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_SERVICES", "quota")
    monkeypatch.setenv("SHIPYARD_QUOTA_PORT", "6001")
    assert [(s.name, s.port) for s in default_services()] == [("quota", 6001)]
    monkeypatch.setenv("SHIPYARD_SERVICES", "nope")
    with pytest.raises(ValueError, match="nope"):
        default_services()


def _runnable(module: str) -> bool:
    try:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    except ModuleNotFoundError:
        return False


def _real_services() -> list[str]:
    return [name for name, module, _ in SERVICES if _runnable(module)]


@pytest.mark.skipif(not _real_services(), reason="no service can run with python -m yet")
def test_real_services(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real service table (every service that can run already: the whole suite once
    they all have a ``__main__``)."""
    names = _real_services()
    monkeypatch.setenv("SHIPYARD_SERVICES", ",".join(names))
    for name in names:
        monkeypatch.setenv(f"SHIPYARD_{name.upper()}_PORT", str(free_port()))
    monkeypatch.setenv("SHIPYARD_GATEWAY_HTTP_PORT", str(free_port()))
    up(home)
    statuses = by_name(status(home))
    assert list(statuses) == ["supervisor", "nats", "postgres", *names]
    assert all(s.healthy for s in statuses.values()), statuses
    config = json.loads((home / "config.json").read_text())
    # The gateway also has its REST data plane's URL.
    assert set(config["endpoints"]) == set(names) | (
        {"gateway_http"} & {f"{n}_http" for n in names}
    )
    if "keys" in names:
        assert config["token"].startswith("sy_")
    down(home)
    up(home)
    assert all_healthy(home), status(home)
    assert json.loads((home / "config.json").read_text())["token"] == config["token"]


def test_a_port_held_for_a_moment_delays_up_instead_of_failing_it(home: Path) -> None:
    """A service whose port is taken (here by a listening socket, released after 5 s;
    on a real machine a client socket in the ephemeral range) exits; ``up`` retries it
    past the three start crashes it forgives otherwise, and succeeds once it is free."""
    spec = fake("late")
    bind_first = (
        "import os, socket, sys, runpy\n"
        "s = socket.socket()\n"
        "try:\n"
        "    s.bind(('127.0.0.1', int(os.environ['SHIPYARD_GRPC_PORT'])))\n"
        "except OSError as exc:\n"
        "    print(f'OSError: {exc}', flush=True)\n"
        "    sys.exit(1)\n"
        "s.close()\n"
        f"sys.argv = [{str(FAKE_SERVICE)!r}]\n"
        f"runpy.run_path({str(FAKE_SERVICE)!r}, run_name='__main__')\n"
    )
    spec = dataclasses.replace(spec, argv=(sys.executable, "-c", bind_first), bootstrap_admin=False)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", spec.port))
    holder.listen()
    log = home / "logs" / "late.log"
    done = threading.Event()

    def release_after_three_exits() -> None:
        # Freed only once the service failed to bind more often than a start forgives.
        while not done.is_set():
            if log.exists() and log.read_text().count("Address already in use") >= 3:
                break
            done.wait(0.05)
        holder.close()

    releaser = threading.Thread(target=release_after_three_exits)
    releaser.start()
    try:
        up(home, services=[spec])
        late = by_name(status(home))["late"]
        assert late.healthy and late.restarts >= 3
    finally:
        done.set()
        releaser.join()
        holder.close()


def test_port_taken_is_told_apart_from_other_crashes() -> None:
    assert port_was_taken("OSError: [Errno 98] Address already in use")
    assert port_was_taken(
        "OSError: cannot bind the gRPC server to 127.0.0.1:50056 (port in use? set ...)"
    )
    assert not port_was_taken("ValueError: SHIPYARD_DATABASE_URL is not a URL")
    # The log spans runs: only the last start's lines count.
    earlier = "\n--- starting x at 10:00 ---\nOSError: [Errno 98] Address already in use"
    assert port_was_taken(earlier)
    assert not port_was_taken(earlier + "\n--- starting x at 10:05 ---\ncannot start: no config")
