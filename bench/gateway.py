"""bench/gateway: one iris prediction through four servers, on one core, in one run.

The iris model (``examples/iris``, scikit-learn LogisticRegression, one row of 4 floats,
as an Open Inference Protocol v2 request) served by:

- **(a) shipyard**: end to end through the gateway (``/v2/models/iris-bench/infer``) with
  a private deployment, a client key (``Authorization: Bearer``) and metrics on, to the
  deployment's one model server (one worker);
- **(b) runtime**: that same model server (``shipyard-runtime``) called directly;
- **(c) mlserver**: MLServer with its scikit-learn runtime serving the same
  ``model.joblib`` (``debug: false, parallel_workers: 0``, its fastest here);
- **(d) floor**: a one-route starlette app under uvicorn calling ``model.predict``;
- and, to show what adaptive batching buys, (b) again with ``--max-batch 1``.

Every server-side process (PostgreSQL, NATS, the services, the model servers, MLServer
and the floor app) runs on core 0; the load generator, ``wrk``, on core 1. Each server is
warmed up, then loaded for ``--seconds`` with 1 and with 16 connections; requests/s, p50
and p99 come from wrk, and every server is reported as a ratio to (c).

MLServer and starlette/uvicorn are not Shipyard's dependencies: they are installed once
into their own virtual environment under ``~/.cache/shipyard-bench`` (``uv``, from PyPI),
with the same scikit-learn, numpy and joblib versions as the model's. ``wrk`` comes from
the distribution (``apt-get install wrk``).

Run: ``./dev bench gateway`` (``--quick``: 3 s per measurement).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench._machine import describe
from bench._stack import (
    build_image,
    client_key,
    cpu_seconds,
    deploy,
    running,
    runtime_pid,
    tar_folder,
)
from shipyard_core.embedded._process import free_port

ROOT = Path(__file__).resolve().parent.parent
IRIS = ROOT / "examples" / "iris"
RESULTS = Path(__file__).parent / "results" / "gateway.json"
CACHE = Path(os.environ.get("SHIPYARD_BENCH_CACHE", Path.home() / ".cache" / "shipyard-bench"))
VENV = CACHE / "mlserver-venv"
SERVER_CORE = 0
LOAD_CORE = 1
CONNECTIONS = (1, 16)
BODY = json.dumps(
    {
        "inputs": [
            {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    },
    separators=(",", ":"),
)

# The floor: the least a Python HTTP server can do per prediction.
FLOOR_APP = """
import json, os, joblib, numpy as np
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

model = joblib.load(os.environ["MODEL"])

async def predict(request):
    body = json.loads(await request.body())
    first = body["inputs"][0]
    rows = np.asarray(first["data"], dtype=np.float64).reshape(first["shape"])
    out = model.predict(rows).tolist()
    data = {"outputs": [{"name": "predict", "shape": [len(out)], "datatype": "BYTES", "data": out}]}
    return Response(json.dumps(data), media_type="application/json")

app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
"""


@dataclass(frozen=True)
class Target:
    """One server under load."""

    key: str
    url: str
    headers: dict[str, str]
    pids: tuple[int, ...] = ()
    """The server-side processes (their children included) whose CPU time is counted."""


def _venv_python() -> Path:
    """MLServer's environment, created on first use."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".shipyard-bench-ready"
    if stamp.exists():
        return python
    uv = shutil.which("uv")
    if uv is None:
        raise SystemExit("bench gateway needs uv on PATH to install MLServer")
    subprocess.run([uv, "venv", "-q", "--clear", "--python", "3.11", str(VENV)], check=True)
    packages = [
        "mlserver",
        "mlserver-sklearn",
        "uvloop<0.22",  # MLServer breaks with newer uvloop
        f"scikit-learn=={version('scikit-learn')}",
        f"numpy=={version('numpy')}",
        f"joblib=={version('joblib')}",
        "starlette",
        "uvicorn",
        "httptools",
    ]
    subprocess.run([uv, "pip", "install", "-q", "--python", str(python), *packages], check=True)
    stamp.write_text("\n".join(packages) + "\n")
    return python


def _ready(url: str, deadline: float = 120) -> None:
    import urllib.request

    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our server
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"{url} did not become ready")
        time.sleep(0.2)


@contextlib.contextmanager
def _mlserver(python: Path, folder: Path) -> Iterator[Target]:
    port = free_port()
    model = folder / "iris"
    model.mkdir(parents=True)
    shutil.copy(IRIS / "model.joblib", model / "model.joblib")
    (model / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "iris",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib"},
            }
        )
    )
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "debug": False,
                "parallel_workers": 0,
                "http_port": port,
                "grpc_port": free_port(),
                "metrics_port": free_port(),
                "host": "127.0.0.1",
            }
        )
    )
    with (folder / "mlserver.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(python.parent / "mlserver"), "start", str(folder)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
    try:
        _ready(f"http://127.0.0.1:{port}/v2/models/iris/ready")
        yield Target("mlserver", f"http://127.0.0.1:{port}/v2/models/iris/infer", {}, (proc.pid,))
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def _floor(python: Path, folder: Path) -> Iterator[Target]:
    port = free_port()
    (folder / "floor_app.py").write_text(FLOOR_APP)
    with (folder / "floor.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                str(python),
                "-m",
                "uvicorn",
                "floor_app:app",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
            env={**os.environ, "MODEL": str(IRIS / "model.joblib")},
        )
    try:
        end = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > end:
                raise RuntimeError("the floor app did not start")
            time.sleep(0.1)
        yield Target("floor", f"http://127.0.0.1:{port}/predict", {}, (proc.pid,))
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def _runtime_without_batching(folder: Path) -> Iterator[Target]:
    """The same runtime on the same model with ``--max-batch 1``: what batching buys."""
    log = (folder / "runtime-nobatch.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shipyard_runtime",
            "serve",
            "--model-dir",
            str(IRIS),
            "--port",
            "0",
            "--workers",
            "1",
            "--name",
            "iris-bench",
            "--max-batch",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # "shipyard-runtime listening on HOST:PORT ..."
        if "listening on" not in line:
            raise RuntimeError(f"the runtime did not start: {line!r}")
        address = line.split("listening on ", 1)[1].split()[0]
        yield Target(
            "runtime_no_batching",
            f"http://{address}/v2/models/iris-bench/infer",
            {},
            (proc.pid,),
        )
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(target: Target, connections: int, seconds: float) -> dict[str, Any]:
    """Loads ``target`` with wrk on the load core; requests/s, p50, p99 and errors."""
    script = ["wrk.method = 'POST'", f"wrk.body = '{BODY}'"]
    headers = {"Content-Type": "application/json", **target.headers}
    script += [f"wrk.headers['{k}'] = '{v}'" for k, v in headers.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write("\n".join(script) + "\n")
    cpu_before = cpu_seconds(target.pids)
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds:g}s",
                "--latency",
                "-s",
                fh.name,
                target.url,
            ],
            capture_output=True,
            text=True,
            check=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {LOAD_CORE}),
        ).stdout
    finally:
        os.unlink(fh.name)
    cpu = cpu_seconds(target.pids) - cpu_before
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return {
        "rps": round(rps, 1),
        "p50_ms": round(_ms(pct["50"]), 3),
        "p99_ms": round(_ms(pct["99"]), 3),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else "",
        "server_cpu_us_per_request": round(cpu / done * 1e6) if done and target.pids else None,
    }


async def _deploy(stack: Any) -> tuple[Target, Target]:
    """The iris model with one worker, private, one replica, a client key: (a) and (b)."""
    manifest = (IRIS / "shipyard.yaml").read_text().replace("workers: 2", "workers: 1")
    image = await build_image(
        stack, tar_folder(IRIS, {"shipyard.yaml": manifest.encode()}), name="iris"
    )
    address = (await deploy(stack, "iris-bench", image))[0]
    secret = await client_key(stack, "iris-bench")
    runtime = runtime_pid("iris-bench")
    gateway = Target(
        "shipyard",
        f"http://127.0.0.1:{stack.http_port}/v2/models/iris-bench/infer",
        {"Authorization": f"Bearer {secret}"},
        (stack.procs["shipyard_gateway"].pid, runtime),
    )
    direct = Target("runtime", f"http://{address}/v2/models/iris-bench/infer", {}, (runtime,))
    return gateway, direct


async def run(quick: bool = False) -> None:
    """Runs the benchmark and writes ``bench/results/gateway.json``."""
    if shutil.which("wrk") is None:
        raise SystemExit("bench gateway needs wrk: apt-get install wrk")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench gateway needs 2 cores (one for servers, one for wrk)")
    python = _venv_python()
    seconds = 3.0 if quick else 10.0
    # Everything started from here on (the stack, the model server, MLServer, the floor)
    # inherits core 0; wrk alone gets core 1.
    os.sched_setaffinity(0, {SERVER_CORE})
    services: dict[str, dict[str, str]] = {
        "shipyard_quota": {},
        "shipyard_imagebuild": {},
        "shipyard_scheduler": {},
        "shipyard_gateway": {},
    }
    results: dict[str, Any] = {"machine": describe(), "seconds": seconds, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-gw-") as tmp:
        async with running(services) as stack:
            gateway, direct = await _deploy(stack)
            with (
                _mlserver(python, Path(tmp) / "mlserver") as mlserver,
                _floor(python, Path(tmp)) as floor,
                _runtime_without_batching(Path(tmp)) as unbatched,
            ):
                targets = [gateway, direct, mlserver, floor, unbatched]
                for target in targets:
                    check = await asyncio.to_thread(wrk, target, 1, 1)
                    if check["non_2xx"] or check["socket_errors"]:
                        raise RuntimeError(f"{target.key} fails requests: {check}")
                for connections in CONNECTIONS:
                    for target in targets:
                        await asyncio.to_thread(wrk, target, connections, 2)  # warm-up
                        measured = await asyncio.to_thread(wrk, target, connections, seconds)
                        results["runs"].setdefault(str(connections), {})[target.key] = measured
                        print(f"c={connections:<2} {target.key:<9} {measured}", flush=True)
    for runs in results["runs"].values():
        base = runs["mlserver"]["rps"]
        for measured in runs.values():
            measured["ratio_to_mlserver"] = round(measured["rps"] / base, 3)
    runs16 = results["runs"]["16"]
    results["targets"] = {
        "a_over_c_at_16": runs16["shipyard"]["ratio_to_mlserver"],
        "a_over_c_at_16_met": runs16["shipyard"]["ratio_to_mlserver"] >= 1.0
        and runs16["shipyard"]["p99_ms"] < 20,
        "b_over_d_at_16": round(runs16["runtime"]["rps"] / runs16["floor"]["rps"], 3),
        "b_over_d_at_16_met": runs16["runtime"]["rps"] >= 0.9 * runs16["floor"]["rps"],
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["targets"], indent=2))
    sys.stdout.flush()
