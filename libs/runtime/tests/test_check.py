"""``python -m shipyard_runtime check``: succeeds on every example, and on broken folders
fails at the right stage with the reason and the fix, always as one JSON line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import EXAMPLES, EXPECTED, HAS_PREDICT_BATCH, assert_close, write_model


def run_check(model_dir: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """Exit code, the verdict (stdout must be exactly one JSON line), stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "shipyard_runtime", "check", "--model-dir", str(model_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be one JSON line, got {proc.stdout!r} ({proc.stderr})"
    return proc.returncode, json.loads(lines[0]), proc.stderr


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_check_passes_on_each_example_with_its_example_input(name: str, tmp_path: Path) -> None:
    manifest = yaml.safe_load((EXAMPLES / name / "shipyard.yaml").read_text())
    example = tmp_path / "example.json"
    example.write_text(json.dumps(manifest["example_input"]))

    code, verdict, _ = run_check(EXAMPLES / name, "--example-json", str(example))

    assert code == 0, verdict
    assert verdict["ok"] is True
    assert verdict["stage"] == "predict"
    assert verdict["script"] == ("score.py" if name == "iris-oci" else "serve.py")
    assert verdict["has_predict_batch"] is HAS_PREDICT_BATCH[name]
    assert_close(verdict["prediction"], EXPECTED[name](manifest["example_input"]))
    assert verdict["load_seconds"] > 0
    assert verdict["predict_seconds"] > 0
    assert verdict["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]


def test_check_without_an_example_stops_after_load() -> None:
    code, verdict, _ = run_check(EXAMPLES / "iris")
    assert code == 0
    assert verdict["stage"] == "load"
    assert verdict["prediction"] is None
    assert verdict["predict_seconds"] is None


def test_check_uses_the_example_from_shipyard_json(tmp_path: Path) -> None:
    folder = tmp_path / "iris"
    shutil.copytree(EXAMPLES / "iris", folder)
    (folder / "shipyard.json").write_text(
        json.dumps({"name": "iris", "example_input": [[6.7, 3.0, 5.2, 2.3]], "workers": 2})
    )
    code, verdict, _ = run_check(folder)
    assert (code, verdict["stage"], verdict["prediction"]) == (0, "predict", ["virginica"])


def test_predict_rejecting_the_example_fails_at_predict(tmp_path: Path) -> None:
    folder = tmp_path / "iris"
    shutil.copytree(EXAMPLES / "iris", folder)
    (folder / "shipyard.json").write_text(json.dumps({"example_input": [[5.1, 3.5, 1.4]]}))

    code, verdict, _ = run_check(folder)

    assert code == 1
    assert verdict["ok"] is False
    assert verdict["stage"] == "predict"
    assert verdict["script"] == "serve.py"
    assert verdict["error"] == "predict() raised ValueError: expected 4 features, got 3"
    assert "example_input" in verdict["fix"]
    # The traceback ends in the user's code, without the runtime's frames on top.
    assert verdict["traceback"].splitlines()[-1] == "ValueError: expected 4 features, got 3"
    assert 'serve.py", line' in verdict["traceback"]
    assert "shipyard_runtime" not in verdict["traceback"]


SIMPLE_PREDICT = """
def predict(model, payload):
    return payload
"""


@pytest.mark.parametrize(
    ("files", "stage", "error", "fix"),
    [
        (
            {"model__joblib": "not a script"},
            "find",
            "neither serve.py nor score.py found in",
            "add serve.py with load(model_dir) and predict(model, payload)",
        ),
        (
            {"serve__py": "import xgboost_that_is_not_installed\n" + SIMPLE_PREDICT},
            "import",
            "importing serve.py raised ModuleNotFoundError: No module named "
            "'xgboost_that_is_not_installed'",
            "add the package that provides 'xgboost_that_is_not_installed' to the requirements",
        ),
        (
            {"serve__py": "def load(model_dir:\n    pass\n"},
            "import",
            "importing serve.py raised SyntaxError",
            "fix the syntax error in serve.py",
        ),
        (
            {"serve__py": "def load(model_dir):\n    return 1\n"},
            "import",
            "serve.py does not define predict(model, payload)",
            "define predict(model, payload)",
        ),
        (
            {"serve__py": "def load():\n    return 1\n" + SIMPLE_PREDICT},
            "import",
            "load() must take one argument, the model folder; serve.py defines load()",
            "define it as load(model_dir)",
        ),
        (
            {"serve__py": "def load_model():\n    return 1\n" + SIMPLE_PREDICT},
            "import",
            "serve.py does not define load(model_dir)",
            "rename the file to score.py",
        ),
        (
            {
                "score__py": "def load_model(path):\n    return 1\n\ndef predict(data, model):\n"
                "    return data\n"
            },
            "import",
            "load_model() must be callable without arguments; score.py defines load_model(path)",
            "give its parameters defaults",
        ),
        (
            {
                "serve__py": "import os\n\ndef load(model_dir):\n"
                "    return open(os.path.join(model_dir, 'model.joblib'), 'rb')\n" + SIMPLE_PREDICT
            },
            "load",
            "load() raised FileNotFoundError: [Errno 2] No such file or directory:",
            "put the model file in the model folder",
        ),
        (
            {
                "serve__py": "def load(model_dir):\n    return 1\n\ndef predict(model, payload):\n"
                "    return {'when': object()}\n"
            },
            "serialize",
            "predict() returned a value that is not JSON-serialisable: object of type object "
            "is not JSON-serialisable",
            "convert numpy arrays with .tolist()",
        ),
    ],
    ids=[
        "no-script",
        "missing-package",
        "syntax-error",
        "no-predict",
        "load-signature",
        "load-model-in-serve",
        "score-load-model-signature",
        "load-raises",
        "unserialisable",
    ],
)
def test_broken_folders_fail_at_the_right_stage(
    tmp_path: Path, files: dict[str, str], stage: str, error: str, fix: str
) -> None:
    folder = write_model(tmp_path / "model", **files)
    example = tmp_path / "example.json"
    example.write_text("[[5.1, 3.5, 1.4, 0.2]]")

    code, verdict, _ = run_check(folder, "--example-json", str(example))

    assert code == 1
    assert verdict["ok"] is False
    assert verdict["stage"] == stage, verdict
    assert verdict["error"].startswith(error), verdict["error"]
    assert fix in verdict["fix"], verdict["fix"]


def test_a_model_printing_to_stdout_does_not_break_the_verdict(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path / "chatty",
        """
        import os
        print("importing")


        def load(model_dir):
            print("loading")
            os.write(1, b"raw fd write\\n")  # C extensions write to fd 1 directly
            return 2


        def predict(model, payload, context):
            print("predicting", context["protocol"])
            return [x * model for x in payload]
        """,
    )
    example = tmp_path / "example.json"
    example.write_text("[1, 2]")
    code, verdict, stderr = run_check(folder, "--example-json", str(example))
    assert (code, verdict["prediction"], verdict["accepts_context"]) == (0, [2, 4], True)
    for text in ("importing", "loading", "raw fd write", "predicting check"):
        assert text in stderr


def test_score_py_runs_in_the_model_folder(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path / "oci",
        **{
            "score__py": """
                import os


                def load_model():
                    # OCI scripts open files relative to the working directory.
                    with open("weights.txt") as f:
                        return {"weight": float(f.read()), "env": os.environ["SHIPYARD_MODEL_DIR"]}


                def predict(data, model=None):
                    return {"scaled": [x * model["weight"] for x in data], "dir": model["env"]}
            """,
            "weights__txt": "3",
        },
    )
    example = tmp_path / "example.json"
    example.write_text("[1, 2]")
    code, verdict, _ = run_check(folder, "--example-json", str(example))
    assert code == 0, verdict
    assert verdict["prediction"] == {"scaled": [3.0, 6.0], "dir": str(folder.resolve())}
    assert verdict["outputs"] == [
        {"name": "scaled", "datatype": "FP64", "shape": [-1]},
        {"name": "dir", "datatype": "BYTES", "shape": [1]},
    ]


def test_invalid_example_json_is_named(tmp_path: Path) -> None:
    example = tmp_path / "example.json"
    example.write_text("[[5.1, ")
    code, verdict, _ = run_check(EXAMPLES / "iris", "--example-json", str(example))
    assert code == 1
    assert verdict["stage"] == "find"
    assert verdict["error"].startswith(f"the example input {example} is not valid JSON")
