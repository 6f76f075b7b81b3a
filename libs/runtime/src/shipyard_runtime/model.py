"""The model folder: its manifest, its serving script, and the loaded model.

Every failure here is a :class:`ModelFolderError` naming the stage it happened in
(``find``, ``import``, ``load``, ``predict``, ``serialize``), what went wrong and, when it
is obvious, the fix. ``check`` prints these; ``serve`` logs them and exits.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVE_SCRIPT = "serve.py"
SCORE_SCRIPT = "score.py"
MANIFEST = "shipyard.json"
MODEL_DIR_ENV = "SHIPYARD_MODEL_DIR"

SERVE_HINT = "add serve.py with load(model_dir) and predict(model, payload)"
_TRACEBACK_LINES = 20


class ModelFolderError(Exception):
    """A model folder that cannot be served, with the stage, the reason and a fix."""

    def __init__(
        self,
        stage: str,
        error: str,
        fix: str | None = None,
        traceback_text: str | None = None,
    ) -> None:
        super().__init__(error)
        self.stage = stage
        self.error = error
        self.fix = fix
        self.traceback_text = traceback_text


@dataclass(frozen=True)
class Manifest:
    """The fields of ``shipyard.json`` (written by the build service) the runtime uses."""

    name: str | None = None
    version: str | None = None
    workers: int | None = None
    has_example: bool = False
    example_input: Any = None
    inputs: list[dict[str, Any]] | None = None
    outputs: list[dict[str, Any]] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def read_manifest(model_dir: Path) -> Manifest:
    """Reads ``shipyard.json`` from ``model_dir``; an absent file is an empty manifest."""
    path = model_dir / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Manifest()
    except OSError as exc:
        raise ModelFolderError("find", f"cannot read {MANIFEST}: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFolderError(
            "find",
            f"{MANIFEST} is not valid JSON: {exc}",
            f"{MANIFEST} is written by the build service from shipyard.yaml; rebuild the image",
        ) from exc
    if not isinstance(raw, dict):
        raise ModelFolderError("find", f"{MANIFEST} must hold a JSON object")

    workers = raw.get("workers")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ModelFolderError(
            "find", f"{MANIFEST} field workers must be a positive integer, got {workers!r}"
        )
    name = raw.get("name")
    version = raw.get("version")
    return Manifest(
        name=str(name) if name not in (None, "") else None,
        version=str(version) if version not in (None, "") else None,
        workers=workers,
        has_example="example_input" in raw and raw["example_input"] is not None,
        example_input=raw.get("example_input"),
        inputs=_tensor_list(raw.get("inputs")),
        outputs=_tensor_list(raw.get("outputs")),
        raw=raw,
    )


def _tensor_list(value: Any) -> list[dict[str, Any]] | None:
    # Tensor metadata is only shown by GET /v2/models/{name}: keep what looks like it.
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return value
    return None


def find_script(model_dir: Path) -> Path:
    """The serving script of ``model_dir``: ``serve.py``, else ``score.py``."""
    if not model_dir.is_dir():
        raise ModelFolderError(
            "find",
            f"model folder {model_dir} does not exist or is not a directory",
            "pass the folder that holds serve.py (or score.py) and the model files",
        )
    for name in (SERVE_SCRIPT, SCORE_SCRIPT):
        candidate = model_dir / name
        if candidate.is_file():
            return candidate
    raise ModelFolderError(
        "find",
        f"neither {SERVE_SCRIPT} nor {SCORE_SCRIPT} found in {model_dir}",
        f"{SERVE_HINT} (or an OCI-style score.py with load_model() and predict(data, model))",
    )


@dataclass(frozen=True)
class ServingScript:
    """An imported serving script whose functions have the contract's signatures."""

    path: Path
    kind: str  # "serve" or "score"
    module: types.ModuleType
    load: Callable[..., Any]
    predict: Callable[..., Any]
    predict_batch: Callable[..., Any] | None
    # How predict() takes the request context: None (it does not), "positional" or
    # "keyword" (a parameter named ``context``). Decided once here, not per request.
    context_mode: str | None


def enter_model_dir(model_dir: Path) -> None:
    """Makes the process look the way both script styles expect: the working directory is
    the model folder (OCI's score.py opens files relatively), ``SHIPYARD_MODEL_DIR`` is set,
    and sibling modules of the script are importable."""
    os.chdir(model_dir)
    os.environ[MODEL_DIR_ENV] = str(model_dir)
    if str(model_dir) not in sys.path:
        sys.path.insert(0, str(model_dir))


def import_script(path: Path) -> ServingScript:
    """Imports ``path`` and checks its functions against the contract (stage ``import``)."""
    # Registered under its own stem ("serve"/"score") so objects pickled with classes
    # defined in the script (``serve.MyTransformer``) unpickle.
    module_name = path.stem
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
        raise ModelFolderError("import", f"cannot import {path.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # a script calling sys.exit() is a broken script too
        sys.modules.pop(module_name, None)
        raise ModelFolderError(
            "import",
            f"importing {path.name} raised {describe_exception(exc)}",
            _import_fix(exc, path.name),
            user_traceback(exc),
        ) from exc
    if path.name == SERVE_SCRIPT:
        return _serve_interface(path, module)
    return _score_interface(path, module)


def _import_fix(exc: BaseException, script: str) -> str | None:
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        return (
            f"add the package that provides {top!r} to the requirements "
            "(requirements.txt or requirements in shipyard.yaml)"
        )
    if isinstance(exc, SyntaxError):
        return f"fix the syntax error in {script}"
    return None


def _function(module: types.ModuleType, name: str) -> Callable[..., Any] | None:
    value = getattr(module, name, None)
    return value if callable(value) else None


def _accepts(fn: Callable[..., Any], nargs: int) -> bool | None:
    """Whether ``fn`` can be called with ``nargs`` positional arguments (None: unknown)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins and some C callables have no signature: trust them
    try:
        signature.bind(*([None] * nargs))
    except TypeError:
        return False
    return True


def _signature_text(name: str, fn: Callable[..., Any]) -> str:
    try:
        return f"{name}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return f"{name}(...)"


def _context_mode(fn: Callable[..., Any]) -> str | None:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    context = parameters.get("context")
    if context is not None and context.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    ):
        return "keyword"
    positional = [
        p
        for p in parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    # A third parameter with a default is the user's own option, not a context slot.
    if len(positional) == 3 and positional[2].default is inspect.Parameter.empty:
        return "positional"
    return None


def _serve_interface(path: Path, module: types.ModuleType) -> ServingScript:
    load = _function(module, "load")
    predict = _function(module, "predict")
    if load is None:
        hint = "define load(model_dir) that returns the model"
        if _function(module, "load_model") is not None:
            hint += " (load_model() is the score.py style: rename the file to score.py)"
        raise ModelFolderError("import", f"{SERVE_SCRIPT} does not define load(model_dir)", hint)
    if predict is None:
        raise ModelFolderError(
            "import",
            f"{SERVE_SCRIPT} does not define predict(model, payload)",
            "define predict(model, payload) that returns a JSON-serialisable result",
        )
    if _accepts(load, 1) is False:
        raise ModelFolderError(
            "import",
            f"load() must take one argument, the model folder; "
            f"{SERVE_SCRIPT} defines {_signature_text('load', load)}",
            "define it as load(model_dir)",
        )
    if _accepts(predict, 2) is False and _context_mode(predict) is None:
        raise ModelFolderError(
            "import",
            f"predict() must take (model, payload); "
            f"{SERVE_SCRIPT} defines {_signature_text('predict', predict)}",
            "define it as predict(model, payload) or predict(model, payload, context)",
        )
    predict_batch = _function(module, "predict_batch")
    if predict_batch is not None and _accepts(predict_batch, 2) is False:
        raise ModelFolderError(
            "import",
            f"predict_batch() must take (model, payloads); "
            f"{SERVE_SCRIPT} defines {_signature_text('predict_batch', predict_batch)}",
            "define it as predict_batch(model, payloads) returning one result per payload",
        )
    return ServingScript(
        path=path,
        kind="serve",
        module=module,
        load=load,
        predict=predict,
        predict_batch=predict_batch,
        context_mode=_context_mode(predict),
    )


def _score_interface(path: Path, module: types.ModuleType) -> ServingScript:
    load = _function(module, "load_model")
    predict = _function(module, "predict")
    if load is None:
        hint = "define load_model() that returns the model"
        if _function(module, "load") is not None:
            hint += " (load(model_dir) is the serve.py style: rename the file to serve.py)"
        raise ModelFolderError("import", f"{SCORE_SCRIPT} does not define load_model()", hint)
    if predict is None:
        raise ModelFolderError(
            "import",
            f"{SCORE_SCRIPT} does not define predict(data, model)",
            "define predict(data, model) that returns a JSON-serialisable result",
        )
    if _accepts(load, 0) is False:
        raise ModelFolderError(
            "import",
            f"load_model() must be callable without arguments; "
            f"{SCORE_SCRIPT} defines {_signature_text('load_model', load)}",
            f"give its parameters defaults; the working directory is the model folder "
            f"and ${MODEL_DIR_ENV} is set",
        )
    if _accepts(predict, 2) is False and _context_mode(predict) is None:
        raise ModelFolderError(
            "import",
            f"predict() must take (data, model); "
            f"{SCORE_SCRIPT} defines {_signature_text('predict', predict)}",
            "define it as predict(data, model) or predict(data, model, context)",
        )
    return ServingScript(
        path=path,
        kind="score",
        module=module,
        load=load,
        predict=predict,
        predict_batch=_function(module, "predict_batch"),
        context_mode=_context_mode(predict),
    )


class LoadedModel:
    """A serving script with its model loaded: ``predict(payload, context)``."""

    __slots__ = ("load_seconds", "model", "predict", "predict_batch", "script", "wants_context")

    def __init__(self, script: ServingScript, model: Any, load_seconds: float) -> None:
        self.script = script
        self.model = model
        self.load_seconds = load_seconds
        self.wants_context = script.context_mode is not None
        # One closure chosen here so the request path makes a single call, no branching.
        fn = script.predict
        predict: Callable[[Any, dict[str, Any] | None], Any]
        if script.kind == "serve":
            if script.context_mode == "keyword":
                predict = lambda payload, ctx: fn(model, payload, context=ctx)  # noqa: E731
            elif script.context_mode == "positional":
                predict = lambda payload, ctx: fn(model, payload, ctx)  # noqa: E731
            else:
                predict = lambda payload, ctx: fn(model, payload)  # noqa: E731
        elif script.context_mode == "keyword":
            predict = lambda payload, ctx: fn(payload, model, context=ctx)  # noqa: E731
        elif script.context_mode == "positional":
            predict = lambda payload, ctx: fn(payload, model, ctx)  # noqa: E731
        else:
            predict = lambda payload, ctx: fn(payload, model)  # noqa: E731
        self.predict = predict
        batch = script.predict_batch
        self.predict_batch: Callable[[list[Any]], Any] | None = None
        """``predict_batch`` with the model bound (payloads → results), if defined."""
        if batch is not None:
            if script.kind == "serve":
                self.predict_batch = lambda payloads: batch(model, payloads)
            else:  # score.py keeps its data-first order: predict_batch(data_list, model)
                self.predict_batch = lambda payloads: batch(payloads, model)

    @property
    def has_predict_batch(self) -> bool:
        """Whether the script defines ``predict_batch`` (reported in metadata)."""
        return self.script.predict_batch is not None


def load_model(script: ServingScript, model_dir: Path) -> LoadedModel:
    """Calls the script's ``load(model_dir)`` / ``load_model()`` (stage ``load``)."""
    name = "load" if script.kind == "serve" else "load_model"
    started = time.perf_counter()
    try:
        model = script.load(str(model_dir)) if script.kind == "serve" else script.load()
    except (Exception, SystemExit) as exc:
        raise ModelFolderError(
            "load",
            f"{name}() raised {describe_exception(exc)}",
            _load_fix(exc),
            user_traceback(exc),
        ) from exc
    return LoadedModel(script, model, time.perf_counter() - started)


def _load_fix(exc: BaseException) -> str | None:
    if isinstance(exc, FileNotFoundError):
        return (
            "put the model file in the model folder and open it relative to it "
            "(os.path.join(model_dir, ...)); the folder is uploaded as is"
        )
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"add the package that provides {exc.name.split('.')[0]!r} to the requirements"
    return None


def describe_exception(exc: BaseException) -> str:
    """``ValueError: expected 4 features, got 3`` (the type name alone when no message)."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def user_traceback(exc: BaseException, max_lines: int = _TRACEBACK_LINES) -> str:
    """The last lines of ``exc``'s traceback, without the runtime's and importlib's frames
    on top (they only push the user's out of view)."""
    tb = exc.__traceback__
    own = str(Path(__file__).parent)
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith((own, "<frozen")):
        tb = tb.tb_next
    lines = "".join(traceback.format_exception(type(exc), exc, tb)).rstrip().splitlines()
    return "\n".join(lines[-max_lines:])
