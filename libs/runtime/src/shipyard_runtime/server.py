"""``serve``: a supervising parent and N pre-forked workers sharing one listening socket.

The parent binds the socket, forks the workers and only supervises: it never imports the
model (a parent holding threads from numpy or onnxruntime is not safe to fork), replaces a
worker that dies, and on SIGTERM/SIGINT drains every worker within a deadline. Each worker
imports the serving script, loads the model once, and only then starts accepting
connections and reports ready through a pipe. When every worker is ready the parent prints
``shipyard-runtime listening on HOST:PORT workers=N``.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from shipyard_runtime.app import App
from shipyard_runtime.balance import NOT_ACCEPTING, ConnectionTable
from shipyard_runtime.httpserver import WorkerServer
from shipyard_runtime.model import (
    Manifest,
    ModelFolderError,
    enter_model_dir,
    find_script,
    import_script,
    load_model,
)

log = logging.getLogger("shipyard_runtime")

EXIT_LOAD_FAILED = 3
_STABLE_SECONDS = 10.0  # a worker that lived this long did not crash-loop
_MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``serve`` needs, resolved from the command line and ``shipyard.json``."""

    model_dir: Path
    name: str
    manifest: Manifest
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body: int = 32 * 1024 * 1024
    keepalive_timeout: float = 75.0
    graceful_timeout: float = 30.0
    backlog: int = 2048
    access_log: bool = False
    max_batch: int = 32


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket every worker shares (port 0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
    sock.set_inheritable(True)
    return sock


# -- worker --------------------------------------------------------------------------


def run_worker(
    config: ServeConfig,
    sock: socket.socket,
    ready_fd: int,
    parent_fd: int,
    table: ConnectionTable | None = None,
    slot: int = 0,
) -> int:
    """A worker's whole life: load the model, serve until told to stop. Returns the exit
    code."""
    try:
        enter_model_dir(config.model_dir)
        script = import_script(find_script(config.model_dir))
        model = load_model(script, config.model_dir)
    except ModelFolderError as exc:
        if exc.traceback_text:
            log.error("%s", exc.traceback_text)
        log.error("cannot serve the model (%s): %s", exc.stage, exc.error)
        if exc.fix:
            log.error("fix: %s", exc.fix)
        return EXIT_LOAD_FAILED
    # The model is loaded once and lives as long as the process: move it out of the
    # garbage collector's generations so full collections don't walk it again and again.
    gc.collect()
    gc.freeze()
    app = App(model, config.name, config.manifest, config.workers)
    app.max_batch = config.max_batch
    log.info("worker %d loaded %s in %.2fs", os.getpid(), script.path.name, model.load_seconds)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(config, app, sock, ready_fd, parent_fd, table, slot))
    finally:
        loop.close()
    return 0


async def _serve(
    config: ServeConfig,
    app: App,
    sock: socket.socket,
    ready_fd: int,
    parent_fd: int,
    table: ConnectionTable | None,
    slot: int,
) -> None:
    loop = asyncio.get_running_loop()
    server = WorkerServer(
        app,
        sock,
        config.max_body,
        config.keepalive_timeout,
        config.access_log,
        table,
        slot,
        max_batch=config.max_batch,
    )
    server.start()
    # Ready only now: the model is loaded and this process accepts connections.
    os.write(ready_fd, f"{os.getpid()}\n".encode())
    os.close(ready_fd)

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def parent_gone() -> None:
        # The parent holds the write end; EOF means it died (even by SIGKILL): don't
        # linger as an orphan serving a socket nobody supervises.
        loop.remove_reader(parent_fd)
        log.warning("worker %d: the supervisor is gone; stopping", os.getpid())
        stop.set()

    loop.add_reader(parent_fd, parent_gone)
    await stop.wait()
    log.info("worker %d draining (%d connection(s) open)", os.getpid(), len(server.connections))
    await server.drain(max(config.graceful_timeout - 1.0, 0.5))


# -- supervisor ----------------------------------------------------------------------


@dataclass
class _Worker:
    pid: int
    slot: int
    started: float
    ready: bool = False


class Supervisor:
    """Forks and watches the workers."""

    def __init__(self, config: ServeConfig, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.workers: dict[int, _Worker] = {}
        # Connection counts per worker slot, for spreading connections (balance.py).
        self.table = ConnectionTable(config.workers) if config.workers > 1 else None
        self._stop_signals = 0
        self._stopping = False
        self._stop_deadline = 0.0
        self._killed = False
        self._announced = False
        self._exit_code = 0
        self._failures = 0
        self._respawn_at: list[tuple[float, int]] = []  # (when, slot)
        self._ready_buffer = b""

    def run(self) -> int:
        """Runs until stopped; returns the process exit code."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        self._alive_r, self._alive_w = os.pipe()
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        # A Python handler (even a no-op) is what makes SIGCHLD wake the select below.
        signal.signal(signal.SIGCHLD, _ignore_signal)

        for slot in range(self.config.workers):
            self._spawn(slot)
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        selector.register(self._ready_r, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in selector.select(self._timeout()):
                    if key.fd == self._wake_r:
                        _drain_fd(self._wake_r)
                    else:
                        self._read_ready()
                self._reap()
                if self._stop_signals and not self._stopping:
                    self._begin_stop("stopping", 0)
                if self._stopping:
                    if self._stop_signals > 1 and not self._killed:
                        log.warning("second stop signal: killing the workers")
                        self._kill_all()
                    if not self.workers:
                        log.info("stopped")
                        return self._exit_code
                    if time.monotonic() >= self._stop_deadline and not self._killed:
                        log.warning(
                            "workers %s did not stop within %.0fs: killing them",
                            sorted(self.workers),
                            self.config.graceful_timeout,
                        )
                        self._kill_all()
                    continue
                self._respawn_due()
        finally:
            signal.set_wakeup_fd(-1)
            selector.close()

    def _timeout(self) -> float | None:
        now = time.monotonic()
        if self._stopping:
            return max(0.0, self._stop_deadline - now) if not self._killed else 0.5
        if self._respawn_at:
            return max(0.0, min(at for at, _ in self._respawn_at) - now)
        return None

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signals += 1

    def _begin_stop(self, why: str, exit_code: int) -> None:
        self._stopping = True
        self._exit_code = exit_code
        self._respawn_at.clear()
        self._stop_deadline = time.monotonic() + self.config.graceful_timeout
        log.info("%s: draining %d worker(s)", why, len(self.workers))
        for pid in self.workers:
            _signal(pid, signal.SIGTERM)

    def _kill_all(self) -> None:
        self._killed = True
        for pid in self.workers:
            _signal(pid, signal.SIGKILL)

    def _spawn(self, slot: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: try again shortly
            log.error("cannot start a worker: %s; retrying in 1s", exc)
            self._respawn_at.append((time.monotonic() + 1.0, slot))
            return
        if pid == 0:  # the worker
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                # Ctrl-C reaches the whole process group: the supervisor decides.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                for fd in (self._wake_r, self._wake_w, self._ready_r, self._alive_w):
                    os.close(fd)
                code = run_worker(
                    self.config, self.sock, self._ready_w, self._alive_r, self.table, slot
                )
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                # Never return into the parent's stack (its loop, its finally blocks).
                os._exit(code)
        self.workers[pid] = _Worker(pid, slot, time.monotonic())

    def _read_ready(self) -> None:
        while True:
            try:
                chunk = os.read(self._ready_r, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._ready_buffer += chunk
        *lines, self._ready_buffer = self._ready_buffer.split(b"\n")
        for line in lines:
            worker = self.workers.get(int(line))
            if worker is not None:
                worker.ready = True
        if (
            not self._announced
            and not self._stopping
            and self.workers
            and all(w.ready for w in self.workers.values())
        ):
            self._announced = True
            host, port = self.sock.getsockname()[:2]
            shown = self.config.host if self.config.host else host
            print(
                f"shipyard-runtime listening on {shown}:{port} workers={len(self.workers)}",
                flush=True,
            )

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if self.table is not None:
                self.table.set(worker.slot, NOT_ACCEPTING)
            how = _describe_status(status)
            if self._stopping:
                log.info("worker %d %s", pid, how)
                continue
            if not self._announced:
                # A worker that could not start before the server ever became ready:
                # the model does not load. Restarting forever would hide that.
                log.error("worker %d %s before the model was loaded; stopping", pid, how)
                self._begin_stop("startup failed", 1)
                continue
            lived = time.monotonic() - worker.started
            self._failures = 0 if lived >= _STABLE_SECONDS else self._failures + 1
            delay = (
                0.0 if self._failures == 0 else min(0.5 * 2 ** (self._failures - 1), _MAX_BACKOFF)
            )
            log.warning(
                "worker %d %s; starting a replacement%s",
                pid,
                how,
                f" in {delay:.1f}s" if delay else "",
            )
            self._respawn_at.append((time.monotonic() + delay, worker.slot))

    def _respawn_due(self) -> None:
        now = time.monotonic()
        due = [slot for at, slot in self._respawn_at if at <= now]
        if not due:
            return
        self._respawn_at = [(at, slot) for at, slot in self._respawn_at if at > now]
        for slot in due:
            self._spawn(slot)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    pass


def _drain_fd(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except BlockingIOError:
            return


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
    except OSError as exc:  # pragma: no cover - EPERM cannot happen for our own children
        if exc.errno != errno.ESRCH:
            raise


def _describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by {name}"
    return f"exited with code {code}"


def serve(config: ServeConfig) -> int:
    """Binds, forks the workers, supervises them until SIGTERM/SIGINT; the exit code."""
    try:
        sock = bind(config.host, config.port, config.backlog)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        return 1
    try:
        return Supervisor(config, sock).run()
    finally:
        sock.close()
