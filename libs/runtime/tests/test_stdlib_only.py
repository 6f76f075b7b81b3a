"""The runtime goes into every model's environment: standard library only, Python 3.10+."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TOOLBOX, RuntimeServer, write_model

SRC = Path(__file__).resolve().parents[1] / "src"


def test_importing_the_runtime_imports_only_the_standard_library() -> None:
    code = """
import sys
before = set(sys.modules)
import shipyard_runtime.__main__, shipyard_runtime.server, shipyard_runtime.check
import shipyard_runtime.httpserver, shipyard_runtime.app, shipyard_runtime.codec
loaded = set(sys.modules) - before
print(sorted(
    m for m in loaded
    if m.split(".")[0] not in sys.stdlib_module_names and not m.startswith("shipyard_runtime")
))
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(out.stdout.replace("'", '"')) == []


def _python310() -> str | None:
    candidates = [
        shutil.which("python3.10"),
        *glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")),
        "/usr/bin/python3.10",
    ]
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            probe = subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"],
                capture_output=True,
                check=False,
            )
            if probe.returncode == 0:
                return candidate
    return None


def test_check_and_serve_work_on_python_3_10(tmp_path: Path) -> None:
    python = _python310()
    if python is None:
        pytest.skip("no Python 3.10 interpreter on this machine")
    folder = write_model(tmp_path / "toolbox", TOOLBOX)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    example = tmp_path / "example.json"
    example.write_text('{"op": "echo", "value": [1, 2]}')
    checked = subprocess.run(
        [
            python,
            "-s",
            "-m",
            "shipyard_runtime",
            "check",
            "--model-dir",
            str(folder),
            "--example-json",
            str(example),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    verdict = json.loads(checked.stdout)
    assert verdict["ok"] is True, verdict
    assert verdict["python"].startswith("3.10.")
    assert verdict["prediction"] == {"op": "echo", "value": [1, 2]}

    server = RuntimeServer(
        folder, tmp_path / "server.log", "--workers", "2", python=python, env=env
    )
    try:
        assert server.request("POST", "/predict", {"op": "pid"})[0] == 200
        assert len(server.workers()) == 2
    finally:
        assert server.stop() == 0, server.logs()
