"""The pre-fork supervisor: replacement of dead workers, graceful stop, startup failures,
and the manifest's defaults."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from shipyard_testing import wait_for_sync

from .conftest import EXAMPLES, RuntimeServer, send, wait_gone, write_model

ROW = [[6.7, 3.0, 5.2, 2.3]]


def _predict_ok(server: RuntimeServer) -> bool:
    status, _, body = server.request(
        "POST",
        "/v2/models/iris/infer",
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": ROW[0]}]},
    )
    assert (status, body["outputs"][0]["data"]) == (200, ["virginica"]), body
    return True


def test_a_killed_worker_is_replaced_and_requests_keep_succeeding(server_factory: Any) -> None:
    server: RuntimeServer = server_factory(EXAMPLES / "iris", "--workers", "2")
    original = server.workers()
    assert len(original) == 2
    victim, survivor = sorted(original)

    os.kill(victim, signal.SIGKILL)
    wait_gone(victim)
    # While the replacement loads, the survivor answers every (new) connection.
    for _ in range(20):
        assert _predict_ok(server)

    replacement = wait_for_sync(
        lambda: (server.workers() - original) or None, message="a replacement worker"
    ).pop()
    wait_for_sync(
        lambda: f"worker {replacement} loaded" in server.logs(),
        timeout=60,
        message="the replacement to load the model",
    )
    assert f"worker {victim} was killed by SIGKILL; starting a replacement" in server.logs()

    # Now the replacement is the only original-free worker left: kill the survivor too and
    # requests still succeed, so the replacement really serves.
    os.kill(survivor, signal.SIGKILL)
    wait_gone(survivor)
    for _ in range(10):
        assert _predict_ok(server)
    assert server.stop() == 0


def test_sigterm_lets_the_request_in_progress_finish(
    server_factory: Any, toolbox_dir: Path, tmp_path: Path
) -> None:
    server: RuntimeServer = server_factory(toolbox_dir, "--workers", "2")
    marker = tmp_path / "started"
    result: dict[str, Any] = {}

    def slow_request() -> None:
        result["response"] = server.request(
            "POST", "/predict", {"op": "slow", "seconds": 1.0, "marker": str(marker)}
        )

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_for_sync(marker.exists, message="predict() to start")
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=30)
    thread.join(timeout=30)
    assert code == 0, server.logs()
    status, _, body = result["response"]
    assert (status, body) == (200, "done")
    assert "stopping: draining 2 worker(s)" in server.logs()


def test_a_request_arriving_during_the_drain_is_answered_not_ready(
    server_factory: Any, toolbox_dir: Path
) -> None:
    server: RuntimeServer = server_factory(toolbox_dir, "--workers", "1")
    (worker,) = server.workers()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # The head now, the body after the drain began: the request is in progress.
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nContent-Length: 2\r\n\r\n")
        # The worker accepts and reads in order: once a later connection is answered, the
        # first one's head has been read.
        assert server.request("GET", "/v2/health/live")[0] == 200
        server.proc.send_signal(signal.SIGTERM)
        wait_for_sync(
            lambda: f"worker {worker} draining" in server.logs(),
            message="the drain to begin",
        )
        sock.sendall(b"{}")
        data = b""
        while chunk := sock.recv(65536):  # the server closes after answering
            data += chunk
    assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close\r\n" in data
    assert data.endswith(b'{"ready":false}')
    assert server.proc.wait(timeout=30) == 0


def test_workers_exit_when_the_supervisor_is_killed(server_factory: Any, toolbox_dir: Path) -> None:
    server: RuntimeServer = server_factory(toolbox_dir, "--workers", "2")
    workers = server.workers()
    assert len(workers) == 2
    server.proc.kill()
    server.proc.wait(timeout=10)
    for pid in workers:
        wait_gone(pid)


def test_a_model_that_cannot_load_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path / "broken",
        """
        def load(model_dir):
            raise FileNotFoundError("model.joblib")


        def predict(model, payload):
            return payload
        """,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shipyard_runtime",
            "serve",
            "--model-dir",
            str(folder),
            "--port",
            "0",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""  # never announced ready
    assert "cannot serve the model (load): load() raised FileNotFoundError: model.joblib" in (
        proc.stderr
    )
    assert "fix: put the model file in the model folder" in proc.stderr
    assert "before the model was loaded; stopping" in proc.stderr


def test_a_folder_without_a_script_is_refused_at_once(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shipyard_runtime",
            "serve",
            "--model-dir",
            str(tmp_path),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: neither serve.py nor score.py found in")
    assert "add serve.py with load(model_dir) and predict(model, payload)" in proc.stderr


def test_name_workers_and_version_come_from_shipyard_json(
    server_factory: Any, toolbox_dir: Path
) -> None:
    (toolbox_dir / "shipyard.json").write_text(
        json.dumps(
            {
                "name": "flowers",
                "version": 3,
                "workers": 3,
                "example_input": [[5.1, 3.5, 1.4, 0.2]],
                "python": "3.11",
                "requirements": [],
            }
        )
    )
    server: RuntimeServer = server_factory(toolbox_dir)
    assert server.ready_line.endswith("workers=3")
    assert len(server.workers()) == 3
    status, _, meta = server.request("GET", "/v2/models/flowers")
    assert status == 200
    assert meta["versions"] == ["3"]
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    status, _, body = server.request(
        "POST",
        "/v2/models/flowers/versions/3/infer",
        {"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2]}]},
    )
    assert status == 200
    assert body["model_version"] == "3"
    assert server.request("GET", "/v2/models/toolbox")[0] == 404
    # --name wins over the manifest.
    other: RuntimeServer = server_factory(toolbox_dir, "--name", "petals", "--workers", "1")
    assert other.ready_line.endswith("workers=1")
    assert other.request("GET", "/v2/models/petals/ready")[0] == 200


def test_a_burst_of_keep_alive_connections_spreads_over_the_workers(
    server_factory: Any, toolbox_dir: Path
) -> None:
    # A gateway opens its pool at once and keeps it: if one worker accepted the whole
    # burst, the others would idle for the pool's lifetime.
    server: RuntimeServer = server_factory(toolbox_dir, "--workers", "2")
    connections = [
        http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(16)
    ]
    try:
        for conn in connections:
            conn.connect()
        owners = [send(conn, "POST", "/predict", "pid")[2] for conn in connections]
    finally:
        for conn in connections:
            conn.close()
    assert set(owners) == server.workers()
    counts = sorted(owners.count(pid) for pid in set(owners))
    # Balanced: 8/8 give or take a race (without balancing: 1/15 to 6/10).
    assert counts[1] - counts[0] <= 2, counts
