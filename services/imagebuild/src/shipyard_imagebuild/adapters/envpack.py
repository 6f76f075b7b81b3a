"""Environment packs: a model folder turned into a relocatable, validated, packed venv.

:func:`build_pack` is the engine of an image build, independent of event sourcing:

1. ``uv venv --relocatable`` with the requested (or the running) Python; uv never
   downloads a Python, so a version missing on the build host is a clear refusal;
2. ``uv pip install`` of the requirements and of ``shipyard-runtime`` (non-editable), with
   a wheel cache shared across builds; every output line goes to the build log;
3. the model folder copied to ``env/model/`` with ``shipyard.json``, the resolved manifest;
4. the real check: ``env/bin/python -m shipyard_runtime check --model-dir env/model``
   imports the serving script, calls ``load()`` and ``predict()`` on the example input;
5. the installed packages listed;
6. the environment packed as a deterministic tar.gz (sorted entries, fixed times and
   owners), digested, and refused when it is over the size limit.

The pack unpacks anywhere (:func:`unpack`) on a host with the same base Python.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tarfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uv import find_uv_bin

# unpack() moved to shipyard_core (the scheduler unpacks packs too); re-imported so that
# shipyard_imagebuild.adapters.envpack.unpack keeps working.
from shipyard_core.envpacks import unpack as unpack
from shipyard_core.envpacks import venv_python_version
from shipyard_core.errors import FailedPrecondition
from shipyard_imagebuild.adapters.folder import (
    MANIFEST_FILE,
    ModelFolder,
    copy_folder,
    format_size,
    inspect_folder,
    source_digest,
    write_tar_gz,
)

# Bump when the pack layout or the build steps change: old cache entries stop matching.
PACK_FORMAT = 1
DEFAULT_SIZE_LIMIT = 1 << 30
# The check may load a big model; a hung load() must still end the build.
DEFAULT_CHECK_TIMEOUT = 600.0
# gzip level 3: on a scikit-learn environment (~210 MB) it packs about twice as fast as
# the default 6 for ~10% more bytes; build latency matters more than storage here.
DEFAULT_COMPRESSLEVEL = 3
_TAIL = 200
# uv marks errors with a multiplication sign when it draws its fancy diagnostics.
_CROSS = "\u00d7"
# Environment variables of the build service that must not leak into the env's Python.
_PYTHON_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "CONDA_PREFIX")

Log = Callable[[str], None]


@dataclass(frozen=True)
class PackResult:
    """What a build produced."""

    path: Path
    """The pack: ``<work_dir>/pack.tar.gz``."""
    digest: str
    """sha256 (hex) of the pack file."""
    size: int
    """Size of the pack file in bytes."""
    python_version: str
    """The environment's full Python version, e.g. ``3.11.7``."""
    packages: list[tuple[str, str]]
    """Installed distributions as ``(name, version)``, sorted by name."""
    unpacked_size: int = 0
    """Bytes of the environment on disk (what the size limit applies to)."""
    source_digest: str = ""
    """The model folder's source digest (see ``folder.source_digest``)."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The ``shipyard.json`` written into the pack's model folder."""
    check: dict[str, Any] | None = None
    """The runtime check's JSON result (None when the check was skipped)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step: venv, install, copy, check, packages, pack, total."""


def default_runtime_source() -> Path:
    """The ``libs/runtime`` folder of this checkout, found from the editable install of
    ``shipyard_runtime`` (``.../libs/runtime/src/shipyard_runtime/__init__.py``)."""
    import shipyard_runtime

    source = Path(shipyard_runtime.__file__).resolve().parents[2]
    if not (source / "pyproject.toml").is_file():
        raise FailedPrecondition(
            f"shipyard_runtime is not installed from a source checkout ({source} has no "
            "pyproject.toml), so there is nothing to install into images (run the service "
            "from the Shipyard checkout, or pass runtime_source)"
        )
    return source


def runtime_version(runtime_source: Path | None = None) -> str:
    """``<version>+<digest>`` of the runtime source (its ``pyproject.toml`` version and a
    digest of ``pyproject.toml`` and ``src/``), so an edited runtime is a different input
    to :func:`cache_key` even before its version is bumped. ``runtime_source`` defaults to
    :func:`default_runtime_source`."""
    runtime_source = runtime_source or default_runtime_source()
    pyproject = runtime_source / "pyproject.toml"
    version = str(tomllib.loads(pyproject.read_text())["project"]["version"])
    h = hashlib.sha256(pyproject.read_bytes())
    if (runtime_source / "src").is_dir():
        h.update(source_digest(runtime_source / "src").encode())
    return f"{version}+{h.hexdigest()[:12]}"


def cache_key(
    folder_digest: str, python_version: str, install_dependencies: bool, runtime_version: str
) -> str:
    """The build cache key: identical inputs give the identical key (sha256 hex).

    ``python_version`` should be the resolved full version (``3.11.7``) when it is known;
    the pack format is part of the key, so a change of the build itself invalidates.
    """
    payload = json.dumps(
        {
            "format": PACK_FORMAT,
            "source": folder_digest,
            "python": python_version,
            "install_dependencies": bool(install_dependencies),
            "runtime": runtime_version,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PYTHON_VARS}
    env.update(extra)
    return env


def _uv_env(cache_dir: Path) -> dict[str, str]:
    return _clean_env(
        {
            # One cache for every uv call: wheels, and the interpreter probes uv caches.
            "UV_CACHE_DIR": str(cache_dir),
            # No network but the package index: uv must use the host's Pythons only.
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_PYTHON_PREFERENCE": "only-system",
            "UV_NO_PROGRESS": "1",
            "NO_COLOR": "1",
        }
    )


async def _run(
    cmd: Sequence[str],
    *,
    log: Log,
    cwd: Path,
    env: dict[str, str],
    timeout: float | None = None,  # noqa: ASYNC109
) -> tuple[int, list[str]]:
    """Runs ``cmd`` with stdout and stderr merged, sending each line to ``log``; returns the
    exit code and the last lines. The child is killed when the caller is cancelled or the
    timeout passes (then the code is -9)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        limit=1 << 20,
    )
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(timeout):
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                tail.append(line)
                log(line)
            code = await proc.wait()
    except TimeoutError:
        code = -9
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return code, list(tail)


async def _run_split(
    cmd: Sequence[str],
    *,
    log: Log,
    cwd: Path,
    env: dict[str, str],
    timeout: float | None,  # noqa: ASYNC109
) -> tuple[int, list[str]]:
    """Like :func:`_run` but keeps stdout apart (returned whole) and logs stderr lines; the
    check's JSON result comes on stdout while tracebacks and the model's prints go to
    stderr."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=16 << 20,
    )
    out: list[str] = []

    async def pump(stream: asyncio.StreamReader, sink: Callable[[str], None]) -> None:
        async for raw in stream:
            sink(raw.decode(errors="replace").rstrip("\r\n"))

    try:
        assert proc.stdout is not None and proc.stderr is not None
        async with asyncio.timeout(timeout):
            await asyncio.gather(pump(proc.stdout, out.append), pump(proc.stderr, log))
            code = await proc.wait()
    except TimeoutError:
        code = -9
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return code, out


def _uv_error(lines: Sequence[str]) -> str:
    """The key lines of a uv failure: ``error: ...`` and its ``cause:``/``╰─▶`` lines."""
    picked: list[str] = []
    capturing = False
    for line in lines:
        text = line.strip()
        for marker in (_CROSS, "╰─▶", "├─▶", "│"):
            text = text.removeprefix(marker).strip()
        if line.startswith("error:") or line.lstrip().startswith(_CROSS):
            capturing = True
            picked.append(text.removeprefix("error:").strip())
        elif capturing and text:
            if text.startswith(("hint:", "help:")):
                break
            picked.append(text.removeprefix("cause:").strip())
    if not picked:
        picked = [line.strip() for line in lines if line.strip()][-3:]
    return " ".join(picked)[:2000]


async def _installed_pythons(uv: str, work_dir: Path, cache_dir: Path) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        uv,
        "python",
        "list",
        "--only-installed",
        "--output-format",
        "json",
        cwd=work_dir,
        env=_uv_env(cache_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    try:
        entries = json.loads(out or b"[]")
    except ValueError:
        return []
    versions = {str(e.get("version")) for e in entries if isinstance(e, dict)}
    return sorted(versions, key=lambda v: tuple(int(p) for p in v.split(".") if p.isdigit()))


def _matches(requested: str, version: str) -> bool:
    return version == requested or version.startswith(requested + ".")


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _pack_entries(env_dir: Path) -> Iterator[tuple[str, Path | None, bytes, int, str]]:
    """Every directory, file and symlink of the env, sorted, with normalised modes.

    ``__pycache__`` is left out: bytecode is rebuilt where the pack runs, and the check
    runs with bytecode writing off anyway, so the pack does not depend on it."""
    for dirpath, dirnames, filenames in os.walk(env_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        base = Path(dirpath)
        rel_base = base.relative_to(env_dir).as_posix()
        names = sorted([*filenames, *(d for d in dirnames if (base / d).is_symlink())])
        # Directories come before their content so extraction can create them first.
        if rel_base != ".":
            yield rel_base, None, tarfile.DIRTYPE, 0o755, ""
        for name in names:
            path = base / name
            rel = f"{rel_base}/{name}" if rel_base != "." else name
            if path.is_symlink():
                yield rel, None, tarfile.SYMTYPE, 0o777, os.readlink(path)
            else:
                mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
                yield rel, path, tarfile.REGTYPE, mode, ""


def _parse_check(stdout: Sequence[str]) -> tuple[int, dict[str, Any] | None]:
    """The check's result line (index, value): the last JSON object with an ``ok`` key (a
    model that prints to stdout adds other lines)."""
    for index in range(len(stdout) - 1, -1, -1):
        text = stdout[index].strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict) and "ok" in value:
                return index, value
    return -1, None


parse_check = _parse_check
"""The check's result line (index, value) among output lines: also how cluster builds find
the verdict in a Kaniko log, where the check ran as a RUN step."""


async def build_runtime_wheel(
    runtime_source: Path, out_dir: Path, *, uv_cache_dir: Path, log: Log
) -> Path:
    """Builds the ``shipyard_runtime-*.whl`` of ``runtime_source`` into the empty or new
    folder ``out_dir`` with ``uv build`` (what cluster builds put into their context);
    returns its path. uv's output goes to ``log``; ``FailedPrecondition`` when it fails."""
    for folder in (out_dir, uv_cache_dir):
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    code, tail = await _run(
        [find_uv_bin(), "build", "--wheel", "--out-dir", str(out_dir), str(runtime_source)],
        log=log,
        cwd=out_dir,
        env=_uv_env(uv_cache_dir),
    )
    wheels = await asyncio.to_thread(lambda: sorted(out_dir.glob("shipyard_runtime-*.whl")))
    if code != 0 or len(wheels) != 1:
        detail = _uv_error(tail) or f"exit code {code}, {len(wheels)} wheel(s)"
        raise FailedPrecondition(
            f"building the shipyard-runtime wheel from {runtime_source} failed: {detail} "
            "(set SHIPYARD_RUNTIME_WHEEL to a prebuilt wheel to skip this step)"
        )
    return wheels[0]


def _prepare(work_dir: Path, uv_cache_dir: Path) -> bool:
    """Creates the folders, removes a leftover env of an interrupted attempt (the build
    starts from nothing) and tells whether cache and work dir share a file system."""
    work_dir.mkdir(parents=True, exist_ok=True)
    uv_cache_dir.mkdir(parents=True, exist_ok=True)
    env_dir = work_dir / "env"
    if env_dir.exists():
        shutil.rmtree(env_dir)
    # Hard links from the cache are fastest but only work within one file system.
    return os.stat(uv_cache_dir).st_dev == os.stat(work_dir).st_dev


async def build_pack(
    folder: Path,
    work_dir: Path,
    *,
    runtime_source: Path | None = None,
    uv_cache_dir: Path,
    python: str | None = None,
    install_dependencies: bool | None = None,
    size_limit_bytes: int = DEFAULT_SIZE_LIMIT,
    log: Log,
    check_timeout: float = DEFAULT_CHECK_TIMEOUT,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
) -> PackResult:
    """Builds, checks and packs the environment of the model folder ``folder``.

    ``python`` and ``install_dependencies`` override the folder's ``shipyard.yaml``
    (None: take the folder's; its default is the running interpreter's Python and
    installing). ``runtime_source`` defaults to :func:`default_runtime_source`. Every uv
    and check output line, the steps and their timings go to ``log``.

    Raises ``InvalidArgument`` for a folder that breaks the contract and
    ``FailedPrecondition`` for a build that cannot succeed: Python not installed,
    unresolvable requirements, a failed check (the message holds the runtime's error and
    fix; the log holds the traceback), or an environment over ``size_limit_bytes``.
    Leaves ``<work_dir>/env`` (the environment) and ``<work_dir>/pack.tar.gz``.
    """
    started = time.monotonic()
    timings: dict[str, float] = {}
    model = await asyncio.to_thread(inspect_folder, folder)
    runtime = runtime_source or default_runtime_source()
    requested = python if python is not None else model.python
    install = model.install_dependencies if install_dependencies is None else install_dependencies
    uv = find_uv_bin()
    env_dir = work_dir / "env"
    env_python = env_dir / "bin" / "python"
    same_fs = await asyncio.to_thread(_prepare, work_dir, uv_cache_dir)
    digest = await asyncio.to_thread(source_digest, model.path)
    log(f"model folder {model.path}: {model.entrypoint}, source digest {digest[:12]}")

    # 1. venv
    t = time.monotonic()
    python_arg = requested or sys.executable
    log(f"$ uv venv --relocatable --python {python_arg}")
    code, lines = await _run(
        [uv, "venv", "--relocatable", "--python", python_arg, str(env_dir)],
        log=log,
        cwd=work_dir,
        env=_uv_env(uv_cache_dir),
    )
    if code != 0:
        if requested is not None:
            # Listing the Pythons probes every interpreter on the PATH (about a second),
            # so it is only done to explain a failure.
            installed = await _installed_pythons(uv, work_dir, uv_cache_dir)
            if not any(_matches(requested, v) for v in installed):
                raise FailedPrecondition(
                    f"Python {requested} is not installed on the build host; installed: "
                    f"{', '.join(installed) or 'none found'} (set python: in shipyard.yaml "
                    "to an installed version, or install that Python on the build host)"
                )
        raise FailedPrecondition(
            f"creating the environment with Python {python_arg} failed: {_uv_error(lines)} "
            "(check the python: setting; the build log has uv's output)"
        )
    python_version = venv_python_version(env_dir)
    timings["venv"] = time.monotonic() - t

    # 2. install
    t = time.monotonic()
    req_args: list[str] = []
    if install:
        for req_file in model.requirement_files:
            req_args += ["-r", str(req_file)]
        if model.inline_requirements:
            inline = work_dir / "requirements.shipyard.txt"
            text = "".join(f"{r}\n" for r in model.inline_requirements)
            await asyncio.to_thread(inline.write_text, text)
            req_args += ["-r", str(inline)]
    elif model.requirements:
        log(
            "install_dependencies is false: the requirements are recorded but not installed "
            f"({', '.join(model.requirements)}); the check will not import the serving script "
            "or call predict()"
        )
    cmd = [
        uv,
        "pip",
        "install",
        "--python",
        str(env_python),
        "--link-mode",
        "hardlink" if same_fs else "copy",
        # The runtime is a local folder: uv would reuse a wheel it built before even when
        # the source changed since, so it is rebuilt every time (well under a second).
        "--refresh-package",
        "shipyard-runtime",
        *req_args,
        str(runtime),
    ]
    log(f"$ uv {' '.join(cmd[1:])}")
    code, lines = await _run(cmd, log=log, cwd=work_dir, env=_uv_env(uv_cache_dir))
    if code != 0:
        raise FailedPrecondition(
            f"installing the requirements failed: {_uv_error(lines)} (fix the requirement "
            "in requirements.txt or shipyard.yaml; the build log has uv's full output)"
        )
    timings["install"] = time.monotonic() - t

    # 3. the model folder and its manifest
    t = time.monotonic()
    model_dir = env_dir / "model"
    await asyncio.to_thread(copy_folder, model.path, model_dir)
    manifest = model.manifest(source_digest=digest, python_version=python_version)
    await asyncio.to_thread(
        (model_dir / MANIFEST_FILE).write_text,
        json.dumps(manifest, indent=2, sort_keys=True) + "\n",
    )
    timings["copy"] = time.monotonic() - t

    # 4. the real check
    t = time.monotonic()
    check = await _check(
        env_python, model, model_dir, install=install, log=log, timeout=check_timeout
    )
    timings["check"] = time.monotonic() - t

    # 5. packages
    t = time.monotonic()
    packages = await _packages(uv, env_python, work_dir, uv_cache_dir)
    log("packages: " + ", ".join(f"{n}=={v}" for n, v in packages))
    timings["packages"] = time.monotonic() - t

    # 6. size limit, then the pack
    t = time.monotonic()
    unpacked = await asyncio.to_thread(_tree_size, env_dir)
    if unpacked > size_limit_bytes:
        raise FailedPrecondition(
            f"the environment is {format_size(unpacked)}, over the "
            f"{format_size(size_limit_bytes)} limit; trim requirements or raise "
            "SHIPYARD_IMAGE_SIZE_LIMIT"
        )
    pack_path = work_dir / "pack.tar.gz"
    pack_digest, pack_size = await asyncio.to_thread(
        write_tar_gz, _pack_entries(env_dir), pack_path, compresslevel=compresslevel
    )
    timings["pack"] = time.monotonic() - t
    timings["total"] = time.monotonic() - started
    log(
        f"packed {format_size(unpacked)} into {format_size(pack_size)}, "
        f"sha256 {pack_digest[:12]}; Python {python_version}, {len(packages)} packages"
    )
    log("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return PackResult(
        path=pack_path,
        digest=pack_digest,
        size=pack_size,
        python_version=python_version,
        packages=packages,
        unpacked_size=unpacked,
        source_digest=digest,
        manifest=manifest,
        check=check,
        timings=timings,
    )


async def _check(
    env_python: Path,
    model: ModelFolder,
    model_dir: Path,
    *,
    install: bool,
    log: Log,
    timeout: float,  # noqa: ASYNC109
) -> dict[str, Any] | None:
    """Runs the runtime's check inside the env; returns its result, or None when skipped.

    Without the dependencies installed, importing the script would fail for reasons that
    are not the model's, so only its syntax is checked then."""
    # No bytecode: the pack stays free of build-time .pyc files (deterministic, smaller).
    env = _clean_env({"PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"})
    if not install:
        log(
            "check: install_dependencies is false, so the check only compiles "
            f"{model.entrypoint}; it does not import it, call load() or predict()"
        )
        code, lines = await _run(
            [
                str(env_python),
                "-c",
                "import sys; compile(open(sys.argv[1], 'rb').read(), sys.argv[1], 'exec')",
                model.entrypoint,
            ],
            log=log,
            cwd=model_dir,
            env=env,
            timeout=60,
        )
        if code != 0:
            detail = next((ln for ln in reversed(lines) if ln.strip()), "")
            raise FailedPrecondition(
                f"{model.entrypoint} does not compile: {detail} (fix the syntax error; the "
                "build log has the details)"
            )
        return None

    what = "import, load() and predict() on the example input"
    if not model.has_example_input:
        what = "import and load() (no example_input in shipyard.yaml, so predict() is not called)"
    log(f"$ python -m shipyard_runtime check: {what}")
    code, out = await _run_split(
        [str(env_python), "-m", "shipyard_runtime", "check", "--model-dir", str(model_dir)],
        log=log,
        cwd=model_dir,
        env=env,
        timeout=timeout,
    )
    index, result = _parse_check(out)
    for i, line in enumerate(out):
        # Lines other than the result are the model's own prints: the user wants them.
        if i != index:
            log(line)
    if code == -9 and result is None:
        raise FailedPrecondition(
            f"the model check did not finish within {timeout:.0f}s (load() or predict() "
            "hangs or is too slow; the build log has its output)"
        )
    if result is None:
        raise FailedPrecondition(
            f"the model check printed no result (exit code {code}); the build log has its "
            "output (is shipyard-runtime installed correctly?)"
        )
    if result.get("traceback"):
        log(str(result["traceback"]).rstrip("\n"))
    if not result.get("ok") or code != 0:
        stage = result.get("stage", "?")
        error = result.get("error") or f"exit code {code}"
        fix = result.get("fix") or "see the build log for the traceback"
        raise FailedPrecondition(f"model check failed at stage {stage}: {error} ({fix})")
    log(f"check passed at stage {result.get('stage')}: {json.dumps(result)[:500]}")
    return result


async def _packages(
    uv: str, env_python: Path, work_dir: Path, cache_dir: Path
) -> list[tuple[str, str]]:
    proc = await asyncio.create_subprocess_exec(
        uv,
        "pip",
        "list",
        "--python",
        str(env_python),
        "--format",
        "json",
        cwd=work_dir,
        env=_uv_env(cache_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise FailedPrecondition(
            f"listing the installed packages failed: {err.decode(errors='replace').strip()}"
        )
    entries = json.loads(out)
    return sorted((str(e["name"]), str(e["version"])) for e in entries)
