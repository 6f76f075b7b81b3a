"""Small process helpers shared by the embedded NATS and PostgreSQL launchers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``.

    The kernel picks it (bind to port 0). Someone else may take it before the caller binds,
    so callers that start a server on it retry with another port when binding fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        with path.open("rb") as fh:
            # Logs can be large after many restarts; only the end matters for a diagnosis.
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.01,
) -> bool:
    """Polls ``condition`` until it is true (True), the deadline passes or ``alive()`` turns
    false (False). Polling starts fast because our servers are usually up within 100 ms."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        if condition():
            return True
        if alive is not None and not alive():
            # One more look: the process may have exited *after* making the condition true.
            return condition()
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def terminate(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Sends ``sig`` to the process, waits up to ``timeout`` s, then SIGKILLs its group."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILLs the process and everything in its process group (it leads its own session),
    then reaps it. Killing the group, not only the leader, is what a crash looks like and
    frees resources (ports, PostgreSQL shared memory) held by children."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait()
