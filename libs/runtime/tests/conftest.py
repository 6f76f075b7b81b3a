"""Helpers for the runtime's tests: the real server as a subprocess, a small HTTP client,
and model folders written on the fly."""

from __future__ import annotations

import http.client
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_iris

from shipyard_testing import wait_for_sync

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
START_TIMEOUT = 90.0  # scikit-learn imports take seconds on a loaded machine


# -- the examples, computed in this process ------------------------------------------

ROWS: list[list[float]] = load_iris().data[::25].tolist()  # 6 rows, all three classes


def _iris(rows: list[list[float]]) -> Any:
    model = joblib.load(EXAMPLES / "iris" / "model.joblib")
    return model.predict(np.asarray(rows)).tolist()


def _iris_oci(rows: list[list[float]]) -> Any:
    with open(EXAMPLES / "iris-oci" / "model.pkl", "rb") as f:
        model = pickle.load(f)  # noqa: S301 - the example's own file
    return {
        "prediction": model.predict(rows).tolist(),
        "probabilities": model.predict_proba(rows).tolist(),
    }


def _iris_onnx(rows: list[list[float]]) -> Any:
    session = ort.InferenceSession(
        str(EXAMPLES / "iris-onnx" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    label, probabilities = session.run(None, {"X": np.asarray(rows, dtype=np.float32)})
    return {"label": label.tolist(), "probabilities": probabilities.tolist()}


EXPECTED: dict[str, Callable[[list[list[float]]], Any]] = {
    "iris": _iris,
    "iris-oci": _iris_oci,
    "iris-onnx": _iris_onnx,
}
HAS_PREDICT_BATCH = {"iris": True, "iris-oci": False, "iris-onnx": False}


def assert_close(got: Any, want: Any, where: str = "") -> None:
    """Equality, with floats compared to 1e-6 (float32 models print rounding noise)."""
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: {got!r}"
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


class RuntimeServer:
    """``python -m shipyard_runtime serve`` running as a child process."""

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        *args: str,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                python,
                "-m",
                "shipyard_runtime",
                "serve",
                "--model-dir",
                str(model_dir),
                "--port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self.ready_line = self._read_ready_line()
        self.port = int(self.ready_line.rsplit(":", 1)[1].split()[0])

    def _read_ready_line(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        buffered = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buffered:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise AssertionError(f"no ready line within {START_TIMEOUT}s: {self.logs()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self.proc.wait(timeout=10)
                    raise AssertionError(f"server exited with {code} before ready: {self.logs()}")
                buffered += chunk
        return buffered.decode().splitlines()[0]

    def logs(self) -> str:
        """What the server wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def workers(self) -> set[int]:
        """The worker pids (the supervisor's children)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return {int(pid) for pid in path.read_text().split()}
        except FileNotFoundError:
            return set()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """One request on a fresh connection: status, headers, JSON body (None if empty)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            return send(conn, method, path, body, headers, raw)
        finally:
            conn.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return code


def send(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    """A request on ``conn`` (keep-alive): status, lower-cased headers, JSON body."""
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=payload, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    return (
        response.status,
        {key.lower(): value for key, value in response.getheaders()},
        json.loads(data) if data else None,
    )


def write_model(folder: Path, serve_py: str | None = None, **files: str) -> Path:
    """A model folder with ``serve.py`` (dedented) and any other files."""
    folder.mkdir(parents=True, exist_ok=True)
    if serve_py is not None:
        (folder / "serve.py").write_text(textwrap.dedent(serve_py))
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(textwrap.dedent(text))
    return folder


# A standard-library model with one behaviour per payload "op", to drive the error paths.
TOOLBOX = """
    import json
    import os
    import time


    def load(model_dir):
        return {"dir": model_dir, "pid": os.getpid()}


    def predict(model, payload, context):
        op = payload.get("op") if isinstance(payload, dict) else payload
        if op == "bad":
            raise ValueError("expected 4 features, got 3")
        if op == "missing":
            return {"x": 1}[payload["key"]]
        if op == "boom":
            raise RuntimeError("secret internal detail")
        if op == "nan":
            return [1.5, float("nan"), float("inf")]
        if op == "object":
            return {"value": object()}
        if op == "context":
            return {
                "user": context["headers"].get("x-forwarded-user"),
                "request_id": context["request_id"],
                "protocol": context["protocol"],
                "parameters": context["parameters"],
            }
        if op == "slow":
            with open(payload["marker"], "w") as f:
                f.write("started")
            time.sleep(payload["seconds"])  # the model being slow, not a test waiting
            return "done"
        if op == "pid":
            return os.getpid()
        return payload
"""


@pytest.fixture
def toolbox_dir(tmp_path: Path) -> Path:
    """A model folder with the toolbox model (standard library only, starts fast)."""
    return write_model(tmp_path / "toolbox", TOOLBOX)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    """Starts servers; stops (SIGTERM) whatever is still running afterwards."""
    started: list[RuntimeServer] = []

    def start(model_dir: Path, *args: str) -> RuntimeServer:
        server = RuntimeServer(model_dir, tmp_path / f"server-{len(started)}.log", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop()


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    """Waits until ``pid`` no longer exists (or is a zombie nobody reaped yet)."""

    def gone() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        return state in "ZX"

    wait_for_sync(gone, timeout=timeout, message=f"process {pid} to exit")
