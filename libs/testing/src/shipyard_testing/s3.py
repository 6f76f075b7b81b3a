"""A real S3 server for tests: moto's standalone server (``moto_server``, from the
``moto[server]`` dev dependency) in a subprocess on a free loopback port. Clients talk
to it over HTTP through boto3 as they would to S3 or MinIO; nothing is patched in the
test process.

:func:`moto_server` runs one; the plugin's ``moto_endpoint`` fixture runs one per test
module with fake credentials in the environment (:func:`s3_environment`).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard_core.embedded import free_port

__all__ = ["S3_ENVIRONMENT", "moto_server", "s3_environment"]

S3_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Fake credentials moto accepts (boto3 and the services' object store read them)."""


@contextlib.contextmanager
def moto_server(log_dir: Path, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Starts ``moto_server`` on a free port of ``host``, waits until it accepts
    connections, yields its endpoint (``http://host:port``), and stops it (SIGTERM, then
    SIGKILL after 10 s). Its output goes to ``log_dir/moto.log``."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.is_file():
        raise RuntimeError(f"{exe} not found: install moto[server] (the dev dependency group)")
    port = free_port(host)
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "moto.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(exe), "-H", host, "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + timeout
            while not _accepts(host, port):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"moto_server exited with {proc.returncode} at start; "
                        f"see {log_dir / 'moto.log'}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not listen on {host}:{port} in {timeout}s")
                time.sleep(0.05)
            yield f"http://{host}:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def s3_environment(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    """Points whatever reads the environment at ``endpoint``: fake credentials, the
    region, ``SHIPYARD_S3_ENDPOINT`` (the services' object store, and the processes they
    start, inherit it); nothing of the host's AWS setup (``AWS_PROFILE``,
    ``AWS_ENDPOINT_URL``) may redirect a client elsewhere."""
    for name, value in S3_ENVIRONMENT.items():
        mp.setenv(name, value)
    mp.setenv("SHIPYARD_S3_ENDPOINT", endpoint)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        mp.delenv(name, raising=False)
