"""The ``local`` runtime backend: every instance is a supervised model server process.

An instance of a revision is ``<env>/bin/python -m shipyard_runtime serve`` run from the
revision's image (an environment pack, unpacked once per digest) on a free port of this
machine. Everything lives under one root folder::

    <root>/images/<digest>/          unpacked environment packs (cache, one per digest)
    <root>/instances/<id>.json       one state file per instance (pid, port, spec, ...)
    <root>/logs/<id>.log             the instance's stdout and stderr, appended across runs

Lifecycle of an instance (``InstancePhase``): PENDING while its image is fetched and
unpacked, STARTING once its process runs, READY while ``GET /v2/health/ready`` answers
200, back to STARTING after three failed checks in a row, FAILED when the process exited
(the message says how, with the last log lines) until it is restarted after an
exponential backoff (``initial_backoff``, doubling up to ``max_backoff``; a run that
lasted ``10 * max_backoff`` resets it). A start that fails before a process runs (the
pack is missing from the object store, the pack's Python is not on this host) is a
failed run too: FAILED, backoff, ``restarts + 1``, so the reconciler sees the crash loop.

Processes are started in their own session, so they outlive the scheduler: a crash or a
restart of the scheduler does not interrupt predictions. :meth:`LocalBackend.open`
adopts them from the state files (a pid counts as the same process only when its start
time in ``/proc`` matches, which rules out pid reuse) and restarts the ones that died in
the meantime (one more restart each). Adopted instances are supervised like any other
and stay until :meth:`LocalBackend.remove` is called for their revision, even when the
reconciler never applies that revision again: it is the reconciler's job to remove what
it sees in :meth:`LocalBackend.observe` and does not want.

Linux only (``/proc``, process groups, pidfds).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shipyard_core.embedded import free_port
from shipyard_core.envpacks import unpack
from shipyard_core.errors import FailedPrecondition, InvalidArgument, NotFound, ShipyardError
from shipyard_core.objectstore import ObjectStore, sha256_file
from shipyard_scheduler.adapters.backend import (
    InstancePhase,
    ObservedInstance,
    RevisionSpec,
)

__all__ = ["LocalBackend"]

log = logging.getLogger(__name__)

_STATE_FORMAT = 1
_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_SUFFIX_LENGTH = 5
# Deployment names are DNS-1123 labels; they end up in file names and instance ids.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_INSTANCE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,120}[a-z0-9])?$")
_DIGEST = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
_READY_REQUEST = b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
# A model server busy with a long prediction may answer its health check late; a short
# timeout still keeps one hung server from stalling its supervisor for long.
_PROBE_TIMEOUT = 2.0
_FAILED_CHECKS_BEFORE_UNREADY = 3
# Until an instance is ready its check repeats this often: a refused connection costs
# microseconds, and every interval is added to a deploy's or a cold start's wait.
_STARTING_PROBE_INTERVAL = 0.05
_MESSAGE_LOG_LINES = 20
# After SIGKILL a process is gone within milliseconds unless stuck in the kernel.
_KILL_WAIT = 5.0
# Exit polling when pidfds are not available (old kernels, exotic event loops).
_POLL_INTERVAL = 0.05
_TAIL_BLOCK = 64 * 1024
# The model server gets a clean environment, like a container: the scheduler's own
# settings (database URL, tokens, cloud credentials) are none of the model's business.
_INHERITED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)
_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(RevisionSpec))


# --- processes ---------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks after boot)`` from ``/proc/<pid>/stat``, or
    None when there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Field 2 (the command name) may hold spaces and parentheses: only what follows the
    # last ')' splits safely. There, index 0 is field 3 (state), index 19 field 22.
    try:
        rest = data[data.rindex(b")") + 2 :].split()
        return rest[0].decode(), int(rest[19])
    except (ValueError, IndexError):
        return None


def _alive(pid: int, start_ticks: int) -> bool:
    """True if ``pid`` is the process that started at ``start_ticks`` and has not exited
    (a zombie has exited: only its exit status is left)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X", "x") and stat[1] == start_ticks


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (its exit code is unknown: an earlier scheduler process started it)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by signal {name}"
    return f"exited with code {code}"


# Children left running by close(), referenced here so that Popen's destructor does not
# warn "still running" about processes that are meant to outlive their supervision, and
# so that they are reaped, not left as zombies, if they exit while this process lives on.
_detached: list[subprocess.Popen[bytes]] = []


def _detach(popen: subprocess.Popen[bytes]) -> None:
    _detached[:] = [p for p in _detached if p.poll() is None]
    _detached.append(popen)


class _Process:
    """One model server process: a child of this scheduler (``popen`` set) or adopted
    from an earlier one. Its pid is also its process group id (it leads its own session).
    """

    def __init__(self, pid: int, start_ticks: int, popen: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self.popen = popen
        self._pidfd: int | None = None
        # A pidfd turns "wait for the exit" into an event instead of polling, for children
        # and adopted processes alike. Opened for an adopted pid *before* its identity is
        # checked (by the caller), so the fd cannot refer to a successor with the same pid.
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(pid)

    @classmethod
    def adopt(cls, pid: int, start_ticks: int) -> _Process | None:
        """The process ``pid`` if it still runs and is the one that started at
        ``start_ticks``; None otherwise."""
        process = cls(pid, start_ticks, None)
        if not _alive(pid, start_ticks):
            process.close()
            return None
        return process

    def exited(self) -> bool:
        """True once the process has exited (before or after it was reaped)."""
        if self.popen is not None:
            if self.popen.returncode is not None:
                return True
            try:
                # WNOWAIT: look without reaping, so the pid (and with it the process group)
                # stays reserved until reap() has cleaned up the group.
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            return info is not None
        return not _alive(self.pid, self.start_ticks)

    async def wait_exit(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Waits up to ``timeout`` seconds for the process to exit; True if it has."""
        if self.exited():
            return True
        loop = asyncio.get_running_loop()
        if self._pidfd is not None:
            exited: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not exited.done():
                    exited.set_result(None)

            try:
                loop.add_reader(self._pidfd, readable)
            except (NotImplementedError, OSError, ValueError):
                pass
            else:
                try:
                    await asyncio.wait([exited], timeout=timeout)
                finally:
                    loop.remove_reader(self._pidfd)
                    exited.cancel()
                return self.exited()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(_POLL_INTERVAL, left))
            if self.exited():
                return True
        return False

    def signal_group(self, sig: int) -> None:
        """Sends ``sig`` to the process's group (its workers too)."""
        if self.popen is None and not _alive(self.pid, self.start_ticks):
            # Not our child: once it is gone its pid may be someone else's.
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(OSError):
                os.kill(self.pid, sig)

    def reap(self) -> str:
        """Cleans up after an exited process and says how it ended."""
        code: int | None = None
        if self.popen is not None:
            # Workers left behind by a crashed server would hold the port and the memory.
            # The unreaped leader still reserves the group id, so this cannot hit others.
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
            code = self.popen.poll()
            description = _describe_exit(code)
        else:
            # An adopted process may still be our child (a scheduler restarted in the
            # same process, as in tests): reap it so it does not linger as a zombie.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
            description = _describe_exit(None)
        self.close()
        return description

    def detach(self) -> None:
        """Stops watching the process, which keeps running."""
        self.close()
        if self.popen is not None:
            _detach(self.popen)

    def close(self) -> None:
        """Releases the pidfd; the process itself is left alone."""
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


async def _probe_ready(host: str, port: int) -> bool:
    """True if the model server at ``host:port`` answers its readiness check with 200."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(_READY_REQUEST)
            await writer.drain()
            status_line = await reader.readline()
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
    parts = status_line.split()
    return len(parts) >= 2 and parts[1] == b"200"


def _free_port(host: str) -> int:
    if ":" in host:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return int(sock.getsockname()[1])
    return free_port(host)


def _tail(path: Path, lines: int, start: int = 0) -> list[str]:
    """The last ``lines`` lines of the file from byte ``start`` on, reading only the end."""
    if lines <= 0:
        return []
    try:
        fh = path.open("rb")
    except OSError:
        return []
    with fh:
        pos = fh.seek(0, os.SEEK_END)
        data = b""
        # One newline more than lines wanted: the first line read may be cut.
        while pos > start and data.count(b"\n") <= lines:
            step = min(_TAIL_BLOCK, pos - start)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


def _spawn(
    cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """Starts a model server with its output appended to ``log_path``; returns the process
    and where its output starts in the log.

    A plain Popen, not asyncio's subprocess: asyncio kills a child when its transport is
    closed or collected, and these processes must outlive the scheduler."""
    with log_path.open("ab") as out:
        offset = out.seek(0, os.SEEK_END)
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            # Its own session: it survives the scheduler, and its workers can be
            # signalled as one group.
            start_new_session=True,
        )
    return popen, offset


def _install_pack(pack: Path, tmp: Path, dest: Path) -> None:
    """Unpacks ``pack`` into ``tmp`` and renames it to ``dest`` (blocking; in a thread).

    The rename is what makes an image appear in the cache, whole or not at all."""
    try:
        unpack(pack, tmp)
        try:
            tmp.rename(dest)
        except OSError:
            # Someone else finished the same digest first (a cancelled fetch whose thread
            # ran on): theirs is just as good.
            if not dest.is_dir():
                raise
    finally:
        pack.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


_COMPILED_MARKER = ".shipyard-compiled"


async def _compile_bytecode(env_dir: Path) -> None:
    """Compiles every Python file of an unpacked environment with its own interpreter,
    niced: background work for the next start, never in the way of a running one. Killed
    when cancelled (a scheduler shutting down does not wait for it). Failures are logged,
    not raised: bytecode is only a speed-up."""
    cmd = [str(env_dir / "bin" / "python"), "-m", "compileall", "-q", "-j", "1", str(env_dir)]
    nice = shutil.which("nice")
    if nice:
        cmd = [nice, "-n", "10", *cmd]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1"},
    )
    try:
        out, _ = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        # compileall exits 1 when one file does not compile (a test fixture with a
        # syntax error in some package): everything else was compiled.
        log.info(
            "compiling %s to bytecode: exit %s: %s",
            env_dir.name[:12],
            proc.returncode,
            out.decode(errors="replace")[-500:],
        )


# --- instances ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Instance:
    instance_id: str
    spec: RevisionSpec
    created: datetime
    restarts: int = 0
    phase: InstancePhase = InstancePhase.PENDING
    message: str = ""
    port: int = 0
    process: _Process | None = None
    log_offset: int = 0
    """Where the current run's output starts in the log (for the exit message)."""
    restart_due: bool = False
    """The next start is a restart (counted then): the last run failed, or the process of
    an adopted state file had died."""
    stopping: bool = False
    task: asyncio.Task[None] | None = None
    """The supervision task."""
    stop_task: asyncio.Task[None] | None = None

    @property
    def revision_id(self) -> tuple[str, int]:
        return self.spec.deployment, self.spec.revision


class LocalBackend:
    """Runs revisions as model server processes on this machine (see the module docs).

    ``objects`` holds the environment packs (``RevisionSpec.pack_key``); ``root`` is the
    backend's folder (images, state files, logs); ``host`` the address model servers bind
    to (``0.0.0.0``/``::`` to listen on every interface; instances are then reported on
    the loopback address). ``grace_seconds`` is how long a stopped instance may finish
    its requests before it is killed. Crashed instances restart after ``initial_backoff``
    seconds, doubling up to ``max_backoff``. Readiness is checked every
    ``health_interval`` seconds.
    """

    name = "local"

    def __init__(
        self,
        objects: ObjectStore,
        root: Path,
        *,
        host: str = "127.0.0.1",
        grace_seconds: float = 10.0,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
        health_interval: float = 0.5,
    ) -> None:
        if grace_seconds <= 0 or initial_backoff <= 0 or health_interval <= 0:
            raise ValueError("grace_seconds, initial_backoff and health_interval must be > 0")
        self._objects = objects
        self._root = root.absolute()
        self._host = host
        # Wildcard binds are reachable on the loopback address; that is what we report.
        self._connect_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104
            host, host
        )
        self._grace = grace_seconds
        self._initial_backoff = initial_backoff
        # A configured first backoff above the cap means "at least that long", not an error.
        self._max_backoff = max(max_backoff, initial_backoff)
        # A run this long was healthy enough that the next crash starts the backoff anew
        # (Kubernetes does the same after 10 minutes with its 5-minute cap).
        self._backoff_reset = 10 * self._max_backoff
        self._health_interval = health_interval
        self._instances: dict[str, _Instance] = {}
        # Instances being stopped (scale-down, remove): observed as TERMINATED until gone.
        self._stopping: dict[str, _Instance] = {}
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._opened = False
        self._on_change: Callable[[], None] | None = None

    # --- paths ---------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The backend's folder."""
        return self._root

    def log_path(self, instance_id: str) -> Path:
        """The file that holds the instance's stdout and stderr (kept after it is removed,
        for log shipping)."""
        return self._root / "logs" / f"{_check_instance_id(instance_id)}.log"

    def _state_path(self, instance_id: str) -> Path:
        return self._root / "instances" / f"{instance_id}.json"

    def _prepare(self) -> None:
        for sub in ("images", "instances", "logs"):
            (self._root / sub).mkdir(parents=True, exist_ok=True)

    def _known(self) -> list[_Instance]:
        """Every instance, the ones being stopped included."""
        return [*self._instances.values(), *self._stopping.values()]

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    # --- the RuntimeBackend protocol -----------------------------------------------------

    def on_change(self, wake: Callable[[], None]) -> None:
        """Calls ``wake`` whenever an instance's phase changes (the reconciler then looks
        at once instead of at its next interval)."""
        self._on_change = wake

    async def open(self) -> None:
        """Creates the folders and adopts the instances of the state files: running ones
        are supervised again, dead ones restarted (one more restart each), half-stopped
        ones stopped. Idempotent."""
        if self._opened:
            return
        self._prepare()
        busy = {digest[:16] for digest, lock in self._image_locks.items() if lock.locked()}
        await asyncio.to_thread(self._remove_leftovers, busy)
        self._opened = True
        for inst in self._load_states():
            if inst.instance_id in self._instances or inst.instance_id in self._stopping:
                continue
            if inst.stopping:
                self._begin_stop(inst)
                continue
            self._instances[inst.instance_id] = inst
            self._start_supervision(inst)
            if inst.process is not None:
                log.info("adopted instance %s (pid %d)", inst.instance_id, inst.process.pid)

    async def apply(self, spec: RevisionSpec) -> None:
        """Makes exactly ``spec.replicas`` instances of the revision exist: starts the
        missing ones (their supervision fetches the image and starts them in the
        background) and stops the extra ones, not-ready first, then newest. Idempotent;
        returns at once."""
        _check_spec(spec)
        if not self._opened:
            self._prepare()
        # No await from here on: concurrent apply()/remove() calls cannot interleave.
        current = [i for i in self._instances.values() if i.revision_id == _revision_id(spec)]
        for _ in range(spec.replicas - len(current)):
            inst = _Instance(
                instance_id=self._new_instance_id(spec), spec=spec, created=datetime.now(UTC)
            )
            self._instances[inst.instance_id] = inst
            self._save(inst)
            self._start_supervision(inst)
            log.info("instance %s of %s created", inst.instance_id, spec.image)
        extra = len(current) - spec.replicas
        if extra > 0:
            # Not-ready ones serve nobody; among equals the newest has the least warm state.
            victims = sorted(
                current,
                key=lambda i: (i.phase is InstancePhase.READY, -i.created.timestamp()),
            )[:extra]
            for inst in victims:
                self._begin_stop(inst)

    async def remove(self, deployment: str, revision: int) -> None:
        """Stops every instance of the revision (SIGTERM to its process group, SIGKILL
        after ``grace_seconds``), deletes their state files and returns once they are
        gone. Unknown revisions are a no-op."""
        wanted = (deployment, revision)
        for inst in [i for i in self._instances.values() if i.revision_id == wanted]:
            self._begin_stop(inst)
        # Also the ones a scale-down is still stopping: after remove() nothing is left.
        tasks = [
            i.stop_task
            for i in self._stopping.values()
            if i.revision_id == wanted and i.stop_task is not None
        ]
        if tasks:
            await asyncio.wait(tasks)

    async def revisions(self) -> set[tuple[str, int]]:
        """The revisions of the instances it runs or is stopping (a local revision with
        no instance leaves nothing behind)."""
        return {i.revision_id for i in self._known()}

    async def observe(self) -> list[ObservedInstance]:
        """Every instance, including the ones being stopped (TERMINATED until their process
        is gone; they do not count as replicas)."""
        instances = self._known()
        return [self._observed(i) for i in sorted(instances, key=lambda i: i.instance_id)]

    async def logs_tail(self, instance_id: str, lines: int = 50) -> str:
        """The last ``lines`` lines of the instance's log (every run of it), or ``""``."""
        if not _INSTANCE_ID.match(instance_id):
            return ""
        tail = await asyncio.to_thread(_tail, self.log_path(instance_id), lines)
        return "".join(f"{line}\n" for line in tail)

    async def close(self) -> None:
        """Stops supervising; the processes keep running (the next :meth:`open`, here or
        in a restarted scheduler, adopts them). Stops in progress finish at that open."""
        instances = self._known()
        tasks = [t for i in instances for t in (i.task, i.stop_task) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for inst in instances:
            if inst.process is not None:
                inst.process.detach()
        self._instances.clear()
        self._stopping.clear()
        self._opened = False

    # --- beyond the protocol -------------------------------------------------------------

    async def shutdown_all(self) -> None:
        """Stops every instance under the root (as :meth:`remove` does) and returns once
        all are gone. Works without :meth:`open` (``shipyard down``): then the instances
        are read from the state files."""
        if not self._opened:
            self._prepare()
            for inst in self._load_states():
                if inst.instance_id not in self._instances:
                    self._instances[inst.instance_id] = inst
        for inst in list(self._instances.values()):
            self._begin_stop(inst)
        tasks = [i.stop_task for i in self._stopping.values() if i.stop_task is not None]
        if tasks:
            await asyncio.wait(tasks)

    def pid(self, instance_id: str) -> int | None:
        """The pid of the instance's model server (its process group leader) while one
        runs, else None."""
        inst = self._instances.get(instance_id) or self._stopping.get(instance_id)
        if inst is None or inst.process is None:
            return None
        return inst.process.pid

    # --- supervision ---------------------------------------------------------------------

    def _start_supervision(self, inst: _Instance) -> None:
        inst.task = asyncio.create_task(
            self._supervise(inst), name=f"local-backend:{inst.instance_id}"
        )

    async def _supervise(self, inst: _Instance) -> None:
        """Keeps one instance running: start, watch readiness, restart with backoff."""
        backoff = self._initial_backoff
        while True:
            ran = 0.0
            from_run = False
            try:
                if inst.process is None:
                    if inst.restart_due:
                        inst.restart_due = False
                        inst.restarts += 1
                    await self._start(inst)
                from_run = True
                started = time.monotonic()
                why = await self._watch(inst)
                ran = time.monotonic() - started
            except asyncio.CancelledError:
                raise
            except ShipyardError as exc:
                why = f"could not start: {exc.message}"
            except Exception as exc:
                log.exception("instance %s: supervision failed", inst.instance_id)
                why = f"could not start: {type(exc).__name__}: {exc}"
            if ran >= self._backoff_reset:
                backoff = self._initial_backoff
            message = f"{why} (next restart in {backoff:g}s)"
            if from_run:
                tail = await asyncio.to_thread(
                    _tail,
                    self.log_path(inst.instance_id),
                    _MESSAGE_LOG_LINES,
                    inst.log_offset,
                )
                if tail:
                    message += "; last log lines:\n" + "\n".join(tail)
            inst.phase = InstancePhase.FAILED
            inst.message = message
            log.warning("instance %s %s", inst.instance_id, why)
            # Recorded before the wait: a scheduler that dies meanwhile still counts the
            # restart when it adopts the instance.
            inst.restart_due = True
            self._save(inst)
            self._changed()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _start(self, inst: _Instance) -> None:
        """Fetches the image if needed and starts the model server (phase STARTING)."""
        inst.phase = InstancePhase.PENDING
        spec = inst.spec
        if spec.image_kind != "pack":
            # The scheduler refuses such deployments; this one was made while it ran the
            # kubernetes backend. The instance fails (and with it the revision) saying so.
            raise FailedPrecondition(
                f"image {spec.image} is a container image built for a cluster (kind "
                f"{spec.image_kind}); the local runtime runs environment packs: run the "
                "scheduler with runtime_backend=kubernetes, or update the deployment to "
                "an image built with build_backend=local"
            )
        env_dir = await self._ensure_image(spec.image, spec.image_digest, spec.pack_key)
        port = _free_port(self._host)
        cmd = [
            str(env_dir / "bin" / "python"),
            "-m",
            "shipyard_runtime",
            "serve",
            "--model-dir",
            str(env_dir / "model"),
            "--port",
            str(port),
            "--host",
            self._host,
            "--workers",
            str(max(1, spec.workers)),
            "--name",
            spec.deployment,
            # The server drains requests in progress within our grace period, so a stop
            # is graceful before the SIGKILL comes.
            "--graceful-timeout",
            f"{self._grace:g}",
        ]
        env = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
        env.update(
            {
                # Prints reach the log as they happen, not when a buffer fills.
                "PYTHONUNBUFFERED": "1",
                # The image is the whole environment: nothing from ~/.local.
                "PYTHONNOUSERSITE": "1",
                "SHIPYARD_INSTANCE_ID": inst.instance_id,
                "SHIPYARD_DEPLOYMENT": spec.deployment,
                "SHIPYARD_REVISION": str(spec.revision),
            }
        )
        env.update(spec.env)
        # No await between Popen and recording the process: a cancelled supervisor can
        # never leave an untracked process behind.
        popen, inst.log_offset = _spawn(
            cmd, env, env_dir / "model", self.log_path(inst.instance_id)
        )
        stat = _proc_stat(popen.pid)
        inst.process = _Process(popen.pid, stat[1] if stat else 0, popen)
        inst.port = port
        inst.phase = InstancePhase.STARTING
        inst.message = ""
        self._save(inst)
        self._changed()
        log.info("instance %s started: pid %d, port %d", inst.instance_id, popen.pid, port)

    async def _watch(self, inst: _Instance) -> str:
        """Checks readiness until the process exits; returns how it ended."""
        process = inst.process
        assert process is not None
        failures = 0
        while not process.exited():
            ok = await _probe_ready(self._connect_host, inst.port)
            if process.exited():
                break
            if ok:
                failures = 0
                if inst.phase is not InstancePhase.READY:
                    inst.phase = InstancePhase.READY
                    inst.message = ""
                    self._changed()
            else:
                failures += 1
                if inst.phase is InstancePhase.READY and failures >= _FAILED_CHECKS_BEFORE_UNREADY:
                    inst.phase = InstancePhase.STARTING
                    inst.message = f"readiness check failed {failures} times in a row"
                    self._changed()
            interval = (
                self._health_interval
                if inst.phase is InstancePhase.READY
                else min(self._health_interval, _STARTING_PROBE_INTERVAL)
            )
            await process.wait_exit(interval)
        inst.process = None
        return process.reap()

    async def prefetch(self, image: str, image_digest: str, pack_key: str) -> bool:
        """Fetches and unpacks an image before any instance needs it, then compiles its
        Python files to bytecode, so a deployment of it starts without either (what a
        node pre-pulling images does). Returns False if it was already prefetched.

        The compilation runs at low priority after the image is visible: an instance
        starting meanwhile does not wait for it."""
        env_dir = await self._ensure_image(image, image_digest, pack_key)
        marker = env_dir / _COMPILED_MARKER
        if marker.exists():
            return False
        started = time.monotonic()
        await _compile_bytecode(env_dir)
        marker.touch()
        log.info("image %s compiled to bytecode in %.2fs", image, time.monotonic() - started)
        return True

    async def prune_images(self, keep: int, protect: frozenset[str] = frozenset()) -> list[str]:
        """Deletes unpacked images no instance uses, beyond the ``keep`` most recently used
        ones; returns the digests deleted. An image is in use while this backend knows an
        instance of it (in any phase, stopping included); ``protect`` (digests) are kept
        too, e.g. those of deployments scaled to zero or stopped, whose next start should
        not unpack again."""
        folder = self._root / "images"
        if not self._opened or not folder.is_dir():
            # Closed (not leading, or between two leaderships): the instances that use
            # images are not known here, so nothing may be judged unused.
            return []
        # No await until every doomed image is renamed away: an instance being created
        # meanwhile (on this event loop) either counts as a user or finds its image gone
        # and unpacks it again; it never starts from a half-deleted folder.
        used = {_digest(i.spec.image_digest) for i in self._known()} | {
            d.removeprefix("sha256:") for d in protect
        }
        unused = [
            d
            for d in folder.iterdir()
            if d.is_dir() and _DIGEST.match(d.name) and d.name not in used
        ]
        unused.sort(key=lambda d: d.stat().st_mtime, reverse=True)
        doomed: list[tuple[str, Path]] = []
        for d in unused[max(keep, 0) :]:
            lock = self._image_locks.get(d.name)
            if lock is not None and lock.locked():
                continue
            away = d.with_name(f".tmp-{d.name[:16]}-{secrets.token_hex(4)}")
            try:
                d.rename(away)
            except OSError:
                continue
            doomed.append((d.name, away))
        for _, away in doomed:
            await asyncio.to_thread(shutil.rmtree, away, True)
        return [name for name, _ in doomed]

    async def _ensure_image(self, image: str, image_digest: str, pack_key: str) -> Path:
        """The unpacked environment of an image, fetched and unpacked on first use
        (once per digest, however many instances ask at the same time)."""
        digest = _digest(image_digest)
        dest = self._root / "images" / digest
        if dest.is_dir():
            with contextlib.suppress(OSError):
                os.utime(dest)  # most recently used: the last one pruned
            return dest
        lock = self._image_locks.setdefault(digest, asyncio.Lock())
        async with lock:
            if dest.is_dir():
                return dest
            if not self._opened:
                self._prepare()
            started = time.monotonic()
            tmp = dest.with_name(f".tmp-{digest[:16]}-{secrets.token_hex(4)}")
            pack = tmp.with_name(tmp.name + ".tar.gz")
            try:
                await self._objects.get_file(pack_key, pack)
            except NotFound:
                pack.unlink(missing_ok=True)
                raise FailedPrecondition(
                    f"the environment pack of image {image} ({pack_key}) is not in "
                    "the object store (rebuild the image)"
                ) from None
            except BaseException:
                pack.unlink(missing_ok=True)
                raise
            actual, _size = await asyncio.to_thread(sha256_file, pack)
            if actual != digest:
                pack.unlink(missing_ok=True)
                raise FailedPrecondition(
                    f"the environment pack of image {image} ({pack_key}) has sha256 "
                    f"{actual}, not the image's digest {digest} (rebuild the image)"
                )
            await asyncio.to_thread(_install_pack, pack, tmp, dest)
            log.info(
                "image %s (%s) unpacked in %.2fs",
                image,
                digest[:12],
                time.monotonic() - started,
            )
            return dest

    # --- stopping ------------------------------------------------------------------------

    def _begin_stop(self, inst: _Instance) -> None:
        """Takes the instance out of the replicas and stops it in the background."""
        self._instances.pop(inst.instance_id, None)
        if inst.stop_task is not None:
            return
        inst.stopping = True
        inst.phase = InstancePhase.TERMINATED
        inst.message = "stopping"
        self._stopping[inst.instance_id] = inst
        # Recorded first: a scheduler that dies now finishes the stop at its next open().
        self._save(inst)
        inst.stop_task = asyncio.create_task(
            self._stop(inst), name=f"local-backend-stop:{inst.instance_id}"
        )

    async def _stop(self, inst: _Instance) -> None:
        if inst.task is not None:
            inst.task.cancel()
            await asyncio.wait([inst.task])
        process = inst.process
        if process is not None:
            if not process.exited():
                process.signal_group(signal.SIGTERM)
                if not await process.wait_exit(self._grace):
                    log.warning(
                        "instance %s did not stop within %gs: killing it",
                        inst.instance_id,
                        self._grace,
                    )
                    process.signal_group(signal.SIGKILL)
                    await process.wait_exit(_KILL_WAIT)
            process.reap()
            inst.process = None
        self._state_path(inst.instance_id).unlink(missing_ok=True)
        self._stopping.pop(inst.instance_id, None)
        log.info("instance %s stopped", inst.instance_id)

    # --- state files ---------------------------------------------------------------------

    def _save(self, inst: _Instance) -> None:
        """Writes the instance's state file atomically.

        Synchronous on purpose (a few hundred bytes): an in-flight write in a thread could
        land after the file was deleted. No fsync: the file is for a restarted scheduler,
        and the page cache survives that; a machine crash takes the processes with it."""
        process = inst.process
        data: dict[str, Any] = {
            "format": _STATE_FORMAT,
            "instance_id": inst.instance_id,
            "deployment": inst.spec.deployment,
            "revision": inst.spec.revision,
            "spec_key": inst.spec.key,
            "image_digest": inst.spec.image_digest,
            "spec": dataclasses.asdict(inst.spec),
            "pid": process.pid if process is not None else None,
            "process_start_ticks": process.start_ticks if process is not None else None,
            "port": inst.port,
            "restarts": inst.restarts,
            "created": inst.created.isoformat(),
            "log_offset": inst.log_offset,
            "stopping": inst.stopping,
            "restart_due": inst.restart_due,
            "message": inst.message if inst.restart_due else "",
        }
        path = self._state_path(inst.instance_id)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        # 0600: the spec's environment may hold secrets.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _load_states(self) -> list[_Instance]:
        instances: list[_Instance] = []
        for path in sorted((self._root / "instances").glob("*.json")):
            try:
                inst = self._load_state(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Left in place for a human to look at; it names no process we can trust.
                log.warning("ignoring unreadable instance state %s: %s", path, exc)
                continue
            instances.append(inst)
        return instances

    def _load_state(self, path: Path) -> _Instance:
        data = json.loads(path.read_text())
        spec_data = {k: v for k, v in data["spec"].items() if k in _SPEC_FIELDS}
        spec = RevisionSpec(**spec_data)
        instance_id = _check_instance_id(str(data["instance_id"]))
        inst = _Instance(
            instance_id=instance_id,
            spec=spec,
            created=datetime.fromisoformat(data["created"]),
            restarts=int(data.get("restarts", 0)),
            port=int(data.get("port", 0)),
            log_offset=int(data.get("log_offset", 0)),
            stopping=bool(data.get("stopping", False)),
            restart_due=bool(data.get("restart_due", False)),
        )
        if inst.restart_due:
            # It had failed and was waiting for its restart.
            inst.phase = InstancePhase.FAILED
            inst.message = str(data.get("message", ""))
        pid, ticks = data.get("pid"), data.get("process_start_ticks")
        if isinstance(pid, int) and isinstance(ticks, int):
            inst.process = _Process.adopt(pid, ticks)
            if inst.process is not None:
                inst.phase = InstancePhase.STARTING
                inst.restart_due = False
            else:
                inst.restart_due = True
                inst.phase = InstancePhase.FAILED
                inst.message = "exited while no scheduler supervised it"
        return inst

    def _remove_leftovers(self, busy: set[str]) -> None:
        """Deletes temporary files of interrupted unpacks and state writes, but not those
        of the unpacks in ``busy`` (digest prefixes) this process is doing: a prefetch may
        run while the backend reopens."""
        for path in (self._root / "images").glob(".tmp-*"):
            if path.name.split("-")[1] in busy:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for path in (self._root / "instances").glob(".*.tmp"):
            path.unlink(missing_ok=True)

    # --- helpers -------------------------------------------------------------------------

    def _new_instance_id(self, spec: RevisionSpec) -> str:
        taken = set(self._instances) | set(self._stopping)
        while True:
            suffix = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_SUFFIX_LENGTH))
            instance_id = f"{spec.key}-{suffix}"
            if instance_id not in taken and not self._state_path(instance_id).exists():
                return instance_id

    def _observed(self, inst: _Instance) -> ObservedInstance:
        host = f"[{self._connect_host}]" if ":" in self._connect_host else self._connect_host
        return ObservedInstance(
            instance_id=inst.instance_id,
            deployment=inst.spec.deployment,
            revision=inst.spec.revision,
            phase=inst.phase,
            address=f"{host}:{inst.port}" if inst.port else "",
            restarts=inst.restarts,
            message=inst.message,
        )


def _revision_id(spec: RevisionSpec) -> tuple[str, int]:
    return spec.deployment, spec.revision


def _digest(image_digest: str) -> str:
    match = _DIGEST.match(image_digest)
    if match is None:
        raise InvalidArgument(
            "image_digest", f"{image_digest!r} is not a sha256 hex digest", "use the image's digest"
        )
    return match.group(1)


def _check_spec(spec: RevisionSpec) -> None:
    if not _NAME.match(spec.deployment):
        raise InvalidArgument(
            "deployment", f"{spec.deployment!r} is not a valid name", "use a DNS-1123 label"
        )
    if spec.revision < 0:
        raise InvalidArgument("revision", f"must be >= 0, got {spec.revision}")
    if spec.replicas < 0:
        raise InvalidArgument("replicas", f"must be >= 0, got {spec.replicas}")
    _digest(spec.image_digest)


def _check_instance_id(instance_id: str) -> str:
    if not _INSTANCE_ID.match(instance_id):
        raise InvalidArgument(
            "instance_id", f"{instance_id!r} is not an instance id", "use <deployment>-r<N>-<id>"
        )
    return instance_id
