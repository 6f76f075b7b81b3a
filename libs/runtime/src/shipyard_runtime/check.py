"""``check``: validate a model folder for real, the way the build service needs it.

Imports the serving script, calls load, and calls predict on the example input (from
``--example-json`` or ``shipyard.json``'s ``example_input``). The verdict is one JSON
object (see README.md, "check"); the first failing stage stops the check.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from shipyard_runtime import __version__, codec
from shipyard_runtime.model import (
    ModelFolderError,
    describe_exception,
    enter_model_dir,
    find_script,
    import_script,
    load_model,
    read_manifest,
    user_traceback,
)

_PREDICT_FIX = (
    "predict() rejected the example input: make example_input (shipyard.yaml) an input "
    "predict() accepts, or fix predict()"
)
_SERIALIZE_FIX = (
    "return lists, dicts, numbers, strings or booleans from predict() "
    "(convert numpy arrays with .tolist())"
)

_NO_EXAMPLE = object()


def _read_example(path: Path | None) -> Any:
    if path is None:
        return _NO_EXAMPLE
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelFolderError("find", f"cannot read the example input {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFolderError(
            "find",
            f"the example input {path} is not valid JSON: {exc}",
            "write the payload predict() receives as JSON",
        ) from exc


def check(model_dir: Path, example_json: Path | None = None) -> dict[str, Any]:
    """Runs the check and returns the verdict (never raises for a broken folder)."""
    model_dir = model_dir.resolve()
    script_name: str | None = None
    try:
        manifest = read_manifest(model_dir)
        script_path = find_script(model_dir)
        script_name = script_path.name
        if example_json is not None and str(example_json) != "-":
            example_json = example_json.absolute()  # before chdir; not resolve(): /dev/fd/N
        example = _read_example(example_json)
        if example is _NO_EXAMPLE and manifest.has_example:
            example = manifest.example_input
        name = manifest.name or model_dir.name

        enter_model_dir(model_dir)
        script = import_script(script_path)
        model = load_model(script, model_dir)
        verdict: dict[str, Any] = {
            "ok": True,
            "script": script_name,
            "stage": "load",
            "name": name,
            "prediction": None,
            "load_seconds": round(model.load_seconds, 6),
            "predict_seconds": None,
            "has_predict_batch": model.has_predict_batch,
            "accepts_context": model.wants_context,
            "inputs": [],
            "outputs": [],
            "python": ".".join(map(str, sys.version_info[:3])),
            "runtime_version": __version__,
        }
        if example is _NO_EXAMPLE:
            return verdict

        context = (
            {
                "headers": {},
                "request_id": "check",
                "protocol": "check",
                "model_name": name,
                "parameters": {},
            }
            if model.wants_context
            else None
        )
        started = time.perf_counter()
        try:
            prediction = model.predict(example, context)
        except Exception as exc:
            raise ModelFolderError(
                "predict",
                f"predict() raised {describe_exception(exc)}",
                _PREDICT_FIX,
                user_traceback(exc),
            ) from exc
        predict_seconds = time.perf_counter() - started
        try:
            encoded = codec.dumps(prediction)
        except codec.NotSerializableError as exc:
            raise ModelFolderError(
                "serialize",
                f"predict() returned a value that is not JSON-serialisable: {exc}",
                _SERIALIZE_FIX,
            ) from exc
        verdict["stage"] = "predict"
        verdict["prediction"] = json.loads(encoded)
        verdict["predict_seconds"] = round(predict_seconds, 6)
        # Tensor metadata for GET /v2/models/{name}: the build service may store it in
        # shipyard.json (inputs/outputs). Best effort: it never fails a check.
        try:
            verdict["inputs"] = codec.tensor_metadata(example, codec.DEFAULT_INPUT)
            verdict["outputs"] = codec.tensor_metadata(prediction, codec.DEFAULT_OUTPUT)
        except Exception:  # noqa: S110 - metadata is optional
            pass
        return verdict
    except ModelFolderError as exc:
        failure: dict[str, Any] = {
            "ok": False,
            "stage": exc.stage,
            "script": script_name,
            "error": exc.error,
            "traceback": exc.traceback_text,
            "fix": exc.fix,
        }
        return failure
