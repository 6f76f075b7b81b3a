"""The whole suite on one machine: ``up``, ``down``, ``status``.

``up`` starts a supervisor process (daemonised, or in the caller's process with
``foreground``) that starts embedded NATS and PostgreSQL (unless external ones are
configured), then every service as its own process; it restarts whatever crashes, with
backoff, until ``down``. Files under the Shipyard home:

- ``run/supervisor.lock``: held (``flock``) by the live supervisor; holds its pid. The lock,
  not a pid file, is the truth about "is it running": it dies with the process.
- ``run/state.json``: phase, pids, addresses, restarts; read by ``status``/``down``.
- ``run/config.json``: what the supervisor was asked to run (see :mod:`.config`).
- ``logs/<component>.log``: each component's output; ``logs/supervisor.log``.
- ``nats/``, ``postgres/``: the embedded servers' data. ``down`` then ``up`` keeps it.

Run as ``python -m shipyard_platform --home H --run-id ID`` by ``up``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no types-psutil in the dev group yet

from shipyard.client.config import (
    CONFIG_FILE as CLIENT_CONFIG_FILE,
)
from shipyard.client.config import (
    DEFAULT_PORTS,
    ClientConfig,
    save_config,
    shipyard_home,
)
from shipyard_core.embedded import (
    EmbeddedServerError,
    NatsProcess,
    PostgresProcess,
)
from shipyard_core.embedded._process import log_tail
from shipyard_platform.config import DATABASE_NAME, PlatformConfig, ServiceSpec
from shipyard_platform.health import grpc_health, nats_health, postgres_health

STOP_TIMEOUT = 10.0  # per service, after SIGTERM, before SIGKILL
DOWN_TIMEOUT = 90.0  # whole ``down``: services, then NATS, then PostgreSQL checkpoint
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a component up this long has its backoff reset
STARTUP_CRASHES = 3  # crashes before being healthy once: fail ``up`` instead of looping
# What a service's log says when its port is taken. The default ports (50051-50056) lie in
# Linux's ephemeral range, so a client socket of anything on the machine can hold one for
# a moment: such an exit is retried until ``up_timeout`` rather than counted as a crash.
_PORT_TAKEN = ("Address already in use", "port in use?")


def service_health(name: str, pid: int | None, port: int) -> tuple[bool, str]:
    """A service's health: its process ``pid`` holds its port, and gRPC health there says
    SERVING. (An answer on the port alone proves nothing: another installation's service
    there answers SERVING too, while this one exits with its port taken.)"""
    if pid is None:
        return False, "not running"
    try:
        sockets = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False, "not running"
    except psutil.AccessDenied:
        sockets = None  # another user's process: its sockets are not ours to read
    if sockets is not None and not any(
        s.status == psutil.CONN_LISTEN and s.laddr and s.laddr.port == port for s in sockets
    ):
        return False, (
            f"not listening on port {port} (held by another program? "
            f"set SHIPYARD_{name.upper()}_PORT)"
        )
    return grpc_health(f"127.0.0.1:{port}")


def port_was_taken(log: str) -> bool:
    """Whether the end of a component's log says its last start could not bind its port
    (only what follows the last ``--- starting`` line counts: the log spans runs)."""
    last_run = log.rsplit("\n--- starting ", 1)[-1]
    return any(marker in last_run for marker in _PORT_TAKEN)


POLL = 0.1

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ALREADY_RUNNING = 3


class PlatformError(RuntimeError):
    """``up`` failed (the message carries the failing component's log tail)."""


@dataclass
class ComponentStatus:
    """What ``status`` reports for one component."""

    name: str
    pid: int | None
    healthy: bool
    detail: str
    address: str | None = None
    restarts: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class Paths:
    """Where things live under the Shipyard home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.run = home / "run"
        self.logs = home / "logs"
        self.state = self.run / "state.json"
        self.config = self.run / "config.json"
        self.lock = self.run / "supervisor.lock"
        self.nats = home / "nats"
        self.postgres = home / "postgres"

    def log(self, component: str) -> Path:
        """``logs/<component>.log``."""
        return self.logs / f"{component}.log"

    def ensure(self) -> None:
        """Creates the directories."""
        self.run.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Atomic: readers in other processes never see half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_state(home: Path) -> dict[str, Any] | None:
    """The supervisor's last recorded state, or None."""
    try:
        data = json.loads(Paths(home).state.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def supervisor_pid(home: Path) -> int | None:
    """The pid of the live supervisor of ``home``, or None if none runs.

    Decided by the lock: if we can take it, nobody holds it.
    """
    paths = Paths(home)
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            content = paths.lock.read_text().strip()
            return int(content) if content.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _process_matches(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The process ``pid`` if it is still the one we started (pids get reused)."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.5:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and has not exited (a zombie has)."""
    return _process_matches(pid, None) is not None


def _create_time(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _gone(proc: psutil.Process) -> bool:
    # A zombie has exited; whether its reaper (pid 1, which in a container may never reap)
    # got to it yet is not our concern.
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _stop_process(proc: psutil.Process, sig: int, timeout: float) -> None:
    """Sends ``sig``, waits, then SIGKILLs the process (and its group, which it leads)."""
    with contextlib.suppress(psutil.Error):
        proc.send_signal(sig)
    if not _wait_gone(proc, timeout):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.kill()
        _wait_gone(proc, 5.0)


# ---------------------------------------------------------------------------- components


class _Component:
    """Something the supervisor keeps running."""

    name = ""
    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        self.restarts = 0
        self.crashes_before_healthy = 0
        self.ever_healthy = False
        self.backoff = BACKOFF_START
        self.started_at = 0.0
        self.next_start: float | None = None  # set while waiting to restart
        self.last_exit = ""

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    @property
    def address(self) -> str:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def external(self) -> bool:
        return False

    def start(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def exit_code(self) -> int | None:
        return None

    def stop(self, timeout: float) -> None:
        raise NotImplementedError

    def health(self) -> tuple[bool, str]:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """This component's entry in ``state.json``."""
        return {
            "name": self.name,
            "pid": self.pid,
            "create_time": _create_time(self.pid),
            "address": self.address,
            "external": self.external,
            "restarts": self.restarts,
            "stop_signal": int(self.stop_signal),
            "log": str(self.log_path),
            "last_exit": self.last_exit,
        }


class _NatsComponent(_Component):
    name = "nats"

    def __init__(self, paths: Paths, port: int, url: str | None) -> None:
        super().__init__()
        self._paths = paths
        self._url = url
        self._server = NatsProcess(paths.nats, port, "127.0.0.1", log_file=paths.log("nats"))

    @property
    def external(self) -> bool:
        return self._url is not None

    @property
    def pid(self) -> int | None:
        return None if self.external else self._server.pid

    @property
    def address(self) -> str:
        return self._url or self._server.url

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    def start(self) -> None:
        if not self.external:
            _kill_leftover_nats(self._paths.nats)
            self._server.start()

    def alive(self) -> bool:
        return self.external or self._server.is_running()

    def stop(self, timeout: float) -> None:
        if not self.external:
            self._server.stop(timeout)

    def health(self) -> tuple[bool, str]:
        return nats_health(self.address)


class _PostgresComponent(_Component):
    name = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown

    def __init__(self, paths: Paths, port: int, url: str | None) -> None:
        super().__init__()
        self._paths = paths
        self._url = url
        self._server = PostgresProcess(
            paths.postgres, port, fsync=True, log_file=paths.log("postgres")
        )

    @property
    def external(self) -> bool:
        return self._url is not None

    @property
    def pid(self) -> int | None:
        return None if self.external else self._server.pid

    @property
    def address(self) -> str:
        return self._url or self._server.dsn(DATABASE_NAME)

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    def start(self) -> None:
        if self.external:
            return
        _kill_leftover_postgres(self._server.pgdata)
        self._server.start()
        self._server.create_database(DATABASE_NAME, exist_ok=True)

    def alive(self) -> bool:
        return self.external or self._server.is_running()

    def stop(self, timeout: float) -> None:
        if not self.external:
            self._server.stop(timeout)

    def health(self) -> tuple[bool, str]:
        return postgres_health(self.address)


class _ServiceComponent(_Component):
    def __init__(self, spec: ServiceSpec, env: dict[str, str], paths: Paths) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self._env = env
        self._paths = paths
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.spec.port}"

    @property
    def log_path(self) -> Path:
        return self._paths.log(self.name)

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"--- starting {self.name} at {time.strftime('%FT%T')} ---\n".encode())
            log.flush()
            # Own session: our signals reach it only when we mean them to, and a stop can
            # take its whole process group.
            self._proc = subprocess.Popen(
                self.spec.command(),
                env=self._env,
                cwd=self._paths.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_code(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def health(self) -> tuple[bool, str]:
        return service_health(self.name, self.pid, self.spec.port)

    def signal_stop(self) -> None:
        """Sends SIGTERM without waiting (services stop in parallel)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self.signal_stop()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()


def _kill_leftover_nats(data_dir: Path) -> None:
    """Stops a nats-server a dead supervisor left on this data dir (found by its ports
    file), so the new one can take the port and the store."""
    for ports_file in data_dir.glob("nats-server_*.ports"):
        pid_text = ports_file.stem.rsplit("_", 1)[-1]
        if pid_text.isdigit():
            proc = _process_matches(int(pid_text), None)
            if proc is not None and "nats-server" in proc.name():
                _stop_process(proc, signal.SIGTERM, STOP_TIMEOUT)
        ports_file.unlink(missing_ok=True)


def _kill_leftover_postgres(pgdata: Path) -> None:
    """Stops a postmaster a dead supervisor left on this cluster (postmaster.pid names it);
    otherwise the new one refuses to start on a cluster in use."""
    try:
        pid_text = (pgdata / "postmaster.pid").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return
    proc = _process_matches(int(pid_text), None) if pid_text.isdigit() else None
    if proc is not None and "postgres" in proc.name():
        _stop_process(proc, signal.SIGINT, 30.0)


# ---------------------------------------------------------------------------- supervisor


class _StartupError(Exception):
    pass


class Supervisor:
    """Runs the platform until asked to stop. One per home (the lock enforces it)."""

    def __init__(self, config: PlatformConfig, run_id: str | None = None) -> None:
        self.config = config
        self.paths = Paths(config.home)
        self.run_id = run_id or uuid.uuid4().hex
        self.phase = "starting"
        self.error: str | None = None
        self._stopping = False
        self._lock_fd: int | None = None
        self.nats = _NatsComponent(self.paths, config.nats_port, config.nats_url)
        self.postgres = _PostgresComponent(self.paths, config.pg_port, config.database_url)
        self.services: list[_ServiceComponent] = []

    # -- lifecycle

    def request_stop(self, *_: object) -> None:
        """Signal handler: stop at the next poll (nothing else is safe in a handler)."""
        self._stopping = True

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the platform cleanly; SIGHUP is ignored (daemon)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _acquire_lock(self) -> bool:
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return True

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _components(self) -> list[_Component]:
        return [self.nats, self.postgres, *self.services]

    def write_state(self) -> None:
        """Records phase, pids and addresses for ``status``/``down`` in other processes."""
        _write_json(
            self.paths.state,
            {
                "run_id": self.run_id,
                "supervisor_pid": os.getpid(),
                "supervisor_create_time": _create_time(os.getpid()),
                "phase": self.phase,
                "error": self.error,
                "nats_url": self.nats.address,
                "database_url": self.postgres.address,
                "updated_at": time.time(),
                "components": [c.record() for c in self._components()],
            },
        )

    def _log(self, message: str) -> None:
        # In the daemon stdout is logs/supervisor.log; in the foreground, the terminal.
        print(f"{time.strftime('%FT%T')} supervisor: {message}", file=sys.stderr, flush=True)

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Starts everything, waits until healthy, bootstraps the admin, then supervises
        until :meth:`request_stop`. Returns an exit code (``EXIT_*``)."""
        self.paths.ensure()
        if not self._acquire_lock():
            self._log("another supervisor already runs for this home")
            return EXIT_ALREADY_RUNNING
        try:
            _cleanup_leftovers(self.paths)
            self.write_state()
            try:
                self._start_all()
                self._wait_healthy()
                if self._stopping:  # asked to stop while starting
                    return EXIT_OK
                self._bootstrap()
            except _StartupError as exc:
                self.phase, self.error = "failed", str(exc)
                self._log(f"startup failed: {exc}")
                self.write_state()
                return EXIT_FAILED
            if self._stopping:
                return EXIT_OK
            self.phase = "running"
            self.write_state()
            self._log("all components healthy")
            if on_ready is not None:
                on_ready()
            self._supervise()
            return EXIT_OK
        finally:
            self._shutdown()
            self._release_lock()

    def _service_env(self, spec: ServiceSpec) -> dict[str, str]:
        keys_port = next(
            (s.port for s in self.config.services if s.name == "keys"),
            int(os.environ.get("SHIPYARD_KEYS_PORT") or DEFAULT_PORTS["keys"]),
        )
        env = dict(os.environ)
        # Every service finds every other one (SHIPYARD_<NAME>_ADDR is each settings'
        # `<name>_addr`), and they share the installation's internal token.
        for other in self.config.services:
            env[f"SHIPYARD_{other.name.upper()}_ADDR"] = f"127.0.0.1:{other.port}"
        env["SHIPYARD_INTERNAL_TOKEN"] = internal_token(self.paths.home)
        env["SHIPYARD_GATEWAY_URL"] = f"http://127.0.0.1:{self.config.gateway_http_port}"
        if spec.name == "gateway":
            env["SHIPYARD_HTTP_PORT"] = str(self.config.gateway_http_port)
        env.update(
            {
                "SHIPYARD_NATS_URL": self.nats.address,
                "SHIPYARD_DATABASE_URL": self.postgres.address,
                "SHIPYARD_GRPC_PORT": str(spec.port),
                "SHIPYARD_KEYS_ADDR": f"127.0.0.1:{keys_port}",
                "SHIPYARD_DATA_DIR": str(self.paths.home),
                "SHIPYARD_HOME": str(self.paths.home),
                "PYTHONUNBUFFERED": "1",  # logs appear as they happen
            }
        )
        return env

    def _start_all(self) -> None:
        for infra in (self.nats, self.postgres):
            self._log(f"starting {infra.name}")
            try:
                infra.start()
            except EmbeddedServerError as exc:
                raise _StartupError(f"{infra.name} did not start: {exc}") from exc
            infra.started_at = time.monotonic()
            self.write_state()
        self.services = [
            _ServiceComponent(spec, self._service_env(spec), self.paths)
            for spec in self.config.services
        ]
        for service in self.services:
            self._log(f"starting {service.name} on port {service.spec.port}")
            service.start()
            service.started_at = time.monotonic()
        self.write_state()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.up_timeout
        pending: dict[str, str] = {c.name: "not checked yet" for c in self._components()}
        while pending and not self._stopping:
            self._restart_crashed(starting=True)
            for component in self._components():
                if component.name not in pending or not component.alive():
                    continue
                healthy, detail = component.health()
                if healthy:
                    component.ever_healthy = True
                    del pending[component.name]
                else:
                    pending[component.name] = detail
            if not pending:
                return
            if time.monotonic() >= deadline:
                name, detail = next(iter(pending.items()))
                component = next(c for c in self._components() if c.name == name)
                raise _StartupError(
                    f"{name} not healthy after {self.config.up_timeout:.0f}s ({detail}); "
                    f"{component.log_path} ends with:\n{log_tail(component.log_path)}"
                )
            time.sleep(0.05)

    def _restart_crashed(self, starting: bool = False) -> None:
        now = time.monotonic()
        changed = False
        for component in self._components():
            if component.alive():
                continue
            if component.next_start is None:
                # Just noticed the crash: schedule the restart.
                code = component.exit_code()
                component.last_exit = f"exited with {code}" if code is not None else "died"
                if now - component.started_at > STABLE_AFTER:
                    component.backoff = BACKOFF_START
                if not component.ever_healthy and not port_was_taken(
                    "\n" + log_tail(component.log_path, 15)
                ):
                    component.crashes_before_healthy += 1
                    if starting and component.crashes_before_healthy >= STARTUP_CRASHES:
                        raise _StartupError(
                            f"{component.name} {component.last_exit} "
                            f"{component.crashes_before_healthy} times while starting; "
                            f"{component.log_path} ends with:\n{log_tail(component.log_path)}"
                        )
                component.next_start = now + component.backoff
                self._log(
                    f"{component.name} {component.last_exit}; restart in {component.backoff:.1f}s"
                )
                component.backoff = min(component.backoff * 2, BACKOFF_MAX)
                changed = True
            elif now >= component.next_start:
                component.next_start = None
                component.restarts += 1
                try:
                    component.start()
                    component.started_at = time.monotonic()
                    self._log(f"restarted {component.name} (pid {component.pid})")
                except EmbeddedServerError as exc:
                    # Counts as another crash: the next round schedules a later retry.
                    self._log(f"restart of {component.name} failed: {exc}")
                changed = True
        if changed:
            self.write_state()

    def _supervise(self) -> None:
        while not self._stopping:
            self._restart_crashed()
            time.sleep(POLL)

    def _bootstrap(self) -> None:
        """Creates the first admin (keys ``bootstrap-admin``) and writes the client config
        with the endpoints; an existing config's token is kept when no admin was created."""
        token = _existing_token(self.paths.home)
        for service in self.services:
            if not service.spec.bootstrap_admin:
                continue
            cmd = [*service.spec.command(), "bootstrap-admin", "--name", "admin"]
            try:
                # stdout holds a secret: captured, never logged. stderr goes to the log.
                with service.log_path.open("ab") as log:
                    result = subprocess.run(
                        cmd,
                        env=self._service_env(service.spec),
                        cwd=self.paths.home,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        timeout=120,
                        check=False,
                    )
            except subprocess.TimeoutExpired as exc:
                raise _StartupError(f"{service.name} bootstrap-admin timed out") from exc
            if result.returncode != 0:
                raise _StartupError(
                    f"{service.name} bootstrap-admin exited with {result.returncode}; "
                    f"{service.log_path} ends with:\n{log_tail(service.log_path)}"
                )
            reply = _last_json_line(result.stdout.decode("utf-8", errors="replace"))
            if reply is None:
                raise _StartupError(f"{service.name} bootstrap-admin printed no JSON line")
            if reply.get("created"):
                token = str(reply["token"])
                self._log(f"created admin user {reply.get('user', 'admin')!r}")
        save_config(ClientConfig(token=token, endpoints=self.config.endpoints()), self.paths.home)

    def _shutdown(self) -> None:
        if self.phase != "failed":
            self.phase = "stopping"
        with contextlib.suppress(OSError):
            self.write_state()
        # Services first (they use NATS and PostgreSQL), in parallel: SIGTERM to all, then
        # wait for each.
        for service in self.services:
            service.signal_stop()
        for service in self.services:
            service.stop(STOP_TIMEOUT)
        self._stop_model_servers()
        self.nats.stop(STOP_TIMEOUT)
        self.postgres.stop(60.0)
        if self.phase != "failed":
            self.phase = "stopped"
        with contextlib.suppress(OSError):
            self.write_state()
        self._log(f"{self.phase}")

    def _stop_model_servers(self) -> None:
        # Model servers run in their own sessions so that they outlive a scheduler crash;
        # `down` is the one time they must stop too.
        for service in self.services:
            if service.name != "scheduler" or service.spec.argv is not None:
                continue
            try:
                done = subprocess.run(
                    [*service.spec.command(), "stop-local-instances"],
                    env=service._env,
                    timeout=60,
                    capture_output=True,
                    text=True,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                self._log(f"stopping model servers failed: {exc}")
                continue
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
                self._log(f"stopping model servers failed ({done.returncode}): {tail[0]}")


def internal_token(home: Path) -> str:
    """The installation's internal token (services calling services), made on first use
    and kept in ``<home>/internal_token`` (mode 0600)."""
    path = home / "internal_token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".internal_token.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    os.replace(tmp, path)
    return token


def _existing_token(home: Path) -> str | None:
    # The file, not load_config(): SHIPYARD_TOKEN in our environment must not be persisted.
    try:
        data = json.loads((home / CLIENT_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    token = data.get("token") if isinstance(data, dict) else None
    return str(token) if token else None


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict):
                    return data
    return None


def _cleanup_leftovers(paths: Paths) -> None:
    """Stops component processes a previous supervisor recorded but did not stop (it was
    killed), services first. Only processes whose pid *and* start time match are touched."""
    state = read_state(paths.home)
    if not state:
        return
    for entry in reversed(state.get("components") or []):
        proc = _process_matches(entry.get("pid"), entry.get("create_time"))
        if proc is not None:
            sig = int(entry.get("stop_signal") or signal.SIGTERM)
            timeout = 60.0 if entry.get("name") == "postgres" else STOP_TIMEOUT
            _stop_process(proc, sig, timeout)


# ---------------------------------------------------------------------------- public API


def _resolve_home(home: Path | None) -> Path:
    return Path(home).expanduser().resolve() if home is not None else shipyard_home().resolve()


def _wait_for_supervisor(
    home: Path, run_id: str | None, child: subprocess.Popen[bytes] | None, timeout: float
) -> None:
    """Waits for the supervisor's verdict: phase ``running`` (return) or ``failed`` (raise).
    ``run_id`` None accepts any run (a supervisor that was already running)."""
    paths = Paths(home)
    deadline = time.monotonic() + timeout
    while True:
        state = read_state(home)
        if state is not None and (run_id is None or state.get("run_id") == run_id):
            phase = state.get("phase")
            if phase == "running":
                return
            if phase == "failed":
                raise PlatformError(f"shipyard up failed: {state.get('error')}")
            if phase in ("stopping", "stopped") and run_id is not None:
                raise PlatformError(
                    "shipyard up: the supervisor stopped while starting; "
                    f"{paths.log('supervisor')} ends with:\n{log_tail(paths.log('supervisor'))}"
                )
        if child is not None and child.poll() is not None:
            if child.returncode == EXIT_ALREADY_RUNNING:
                # Lost a race with another ``up``: wait for that supervisor instead.
                child, run_id = None, None
                continue
            state = read_state(home)
            if state is not None and state.get("run_id") == run_id and state.get("error"):
                raise PlatformError(f"shipyard up failed: {state['error']}")
            raise PlatformError(
                f"shipyard up: the supervisor exited with {child.returncode}; "
                f"{paths.log('supervisor')} ends with:\n{log_tail(paths.log('supervisor'))}"
            )
        if child is None and run_id is None and supervisor_pid(home) is None:
            raise PlatformError("shipyard up: the running supervisor went away")
        if time.monotonic() >= deadline:
            raise PlatformError(
                f"shipyard up: not ready after {timeout:.0f}s; see {paths.logs}; "
                f"{paths.log('supervisor')} ends with:\n{log_tail(paths.log('supervisor'))}"
            )
        time.sleep(0.05)


def up(
    home: Path | None = None,
    foreground: bool = False,
    services: list[ServiceSpec] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Starts the platform under ``home`` (default: the Shipyard home) and returns once every
    component is healthy and the admin is bootstrapped; raises :class:`PlatformError` with
    the failing component's log tail otherwise.

    ``foreground`` runs the supervisor in this process and returns only after SIGINT or
    SIGTERM (then everything has been stopped); ``on_ready`` is called once healthy.
    ``services`` overrides the service table (tests); ports and external NATS/PostgreSQL
    come from the environment, see :mod:`shipyard_platform.config`. If a supervisor already
    runs for ``home``, waits for it to be healthy and returns (``up`` twice is harmless).
    """
    home = _resolve_home(home)
    config = PlatformConfig.from_env(home, services)
    paths = Paths(home)
    paths.ensure()
    wait_timeout = config.up_timeout + 120.0  # the supervisor enforces up_timeout itself
    if supervisor_pid(home) is not None:
        _wait_for_supervisor(home, None, None, wait_timeout)
        if on_ready is not None:
            on_ready()
        return
    if foreground:
        supervisor = Supervisor(config)
        supervisor.install_signal_handlers()
        code = supervisor.run(on_ready)
        if code == EXIT_ALREADY_RUNNING:
            _wait_for_supervisor(home, None, None, wait_timeout)
        elif code != EXIT_OK:
            raise PlatformError(f"shipyard up failed: {supervisor.error}")
        return
    run_id = uuid.uuid4().hex
    paths.config.write_text(config.to_json())
    with paths.log("supervisor").open("ab") as log:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                # The package, not this module: running an already imported module with
                # -m makes runpy warn.
                "shipyard_platform",
                "--home",
                str(home),
                "--run-id",
                run_id,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,  # detached: survives the CLI and its terminal
        )
    _wait_for_supervisor(home, run_id, child, wait_timeout)
    if on_ready is not None:
        on_ready()


def down(home: Path | None = None, timeout: float = DOWN_TIMEOUT) -> None:
    """Stops the platform: services, then NATS, then PostgreSQL (SIGTERM, wait, SIGKILL after
    a deadline). Idempotent; also cleans up after a supervisor that was killed."""
    home = _resolve_home(home)
    paths = Paths(home)
    pid = supervisor_pid(home)
    if pid is not None and pid > 0:
        proc = _process_matches(pid, None)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while supervisor_pid(home) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if supervisor_pid(home) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while supervisor_pid(home) is not None and time.monotonic() < deadline + 10:
                time.sleep(0.05)
        if proc is not None:
            # The lock goes a moment before the process: wait until it is really gone.
            _wait_gone(proc, 10.0)
    # Whatever the supervisor could not stop (or a killed supervisor left behind).
    if paths.state.exists():
        _cleanup_leftovers(paths)
        state = read_state(home)
        if state is not None and state.get("phase") not in ("stopped", "failed"):
            state["phase"] = "stopped"
            _write_json(paths.state, state)


def _component_status(entry: dict[str, Any], phase: str) -> ComponentStatus:
    name = str(entry["name"])
    address = entry.get("address")
    external = bool(entry.get("external"))
    proc = None if external else _process_matches(entry.get("pid"), entry.get("create_time"))
    restarts = int(entry.get("restarts") or 0)
    pid = proc.pid if proc is not None else None
    if not external and proc is None:
        return ComponentStatus(name, None, False, f"not running ({phase})", address, restarts)
    if name == "nats":
        healthy, detail = nats_health(str(address))
    elif name == "postgres":
        healthy, detail = postgres_health(str(address))
    else:
        healthy, detail = service_health(name, pid, int(str(address).rsplit(":", 1)[1]))
    if external:
        detail = f"external, {detail}"
    return ComponentStatus(name, pid, healthy, detail, address, restarts)


def status(home: Path | None = None) -> list[ComponentStatus]:
    """Per component (supervisor, nats, postgres, then each service): pid, health (checked
    now: gRPC health, NATS greeting, PostgreSQL ``SELECT 1``) and a detail."""
    home = _resolve_home(home)
    state = read_state(home) or {}
    pid = supervisor_pid(home)
    phase = str(state.get("phase") or "never started")
    if pid is None and phase in ("starting", "running", "stopping"):
        phase = "supervisor not running"
    detail = phase if not state.get("error") else f"{phase}: {str(state['error']).splitlines()[0]}"
    result = [
        ComponentStatus("supervisor", pid, pid is not None and phase == "running", detail, None)
    ]
    entries = list(state.get("components") or [])
    with ThreadPoolExecutor(max_workers=max(1, len(entries))) as pool:
        result += list(pool.map(lambda e: _component_status(e, phase), entries))
    return result


@contextlib.contextmanager
def running(home: Path | None = None, services: list[ServiceSpec] | None = None) -> Iterator[Path]:
    """``up`` on entry, ``down`` on exit (tests, scripts). Yields the home."""
    resolved = _resolve_home(home)
    try:
        up(resolved, services=services)
        yield resolved
    finally:
        down(resolved)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the supervisor process started by :func:`up`."""
    parser = argparse.ArgumentParser(prog="python -m shipyard_platform")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    paths = Paths(args.home)
    config = PlatformConfig.from_json(paths.config.read_text())
    supervisor = Supervisor(config, run_id=args.run_id)
    supervisor.install_signal_handlers()
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
