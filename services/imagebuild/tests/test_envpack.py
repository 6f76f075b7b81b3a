"""Environment packs for real: real uv, real resolution against the configured package
index, real scikit-learn, the real runtime's check inside the built environment.

One uv cache for the whole module keeps the second and later builds fast.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from shipyard_core.errors import FailedPrecondition, InvalidArgument
from shipyard_imagebuild.adapters import envpack
from shipyard_imagebuild.adapters.envpack import PackResult, build_pack, cache_key, unpack
from shipyard_imagebuild.adapters.folder import (
    extract_archive,
    format_size,
    inspect_folder,
    make_source_archive,
    source_digest,
)
from shipyard_testing import wait_for_sync

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_IRIS = REPO / "examples" / "iris"

ECHO_SERVE = """\
def load(model_dir):
    return {"dir": str(model_dir)}


def predict(model, payload):
    return {"echo": payload}
"""

# Stands in for examples/iris until that exists: trains on sklearn's bundled iris data.
IRIS_SERVE = """\
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression


def load(model_dir):
    data = load_iris()
    return LogisticRegression(max_iter=500).fit(data.data, data.target)


def predict(model, payload):
    return model.predict(payload).tolist()
"""


def make_folder(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


class Log:
    """Collects the build log lines (the build log users read)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def uv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uv-cache")


@pytest.fixture(scope="module")
def iris_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (EXAMPLE_IRIS / "serve.py").is_file():
        return EXAMPLE_IRIS
    return make_folder(
        tmp_path_factory.mktemp("iris") / "iris",
        {
            "serve.py": IRIS_SERVE,
            "requirements.txt": "scikit-learn>=1.5\n",
            "shipyard.yaml": "name: iris\nworkers: 2\nexample_input: [[5.1, 3.5, 1.4, 0.2]]\n",
            "README.md": "# iris\n",
        },
    )


@pytest.fixture(scope="module")
async def iris_build(
    tmp_path_factory: pytest.TempPathFactory, iris_folder: Path, uv_cache: Path
) -> tuple[PackResult, Log]:
    """The iris folder built once; the env it was built in is deleted afterwards, so
    everything that runs the pack proves it works from elsewhere."""
    work = tmp_path_factory.mktemp("iris-build")
    log = Log()
    result = await build_pack(
        iris_folder, work, uv_cache_dir=uv_cache, python=None, install_dependencies=True, log=log
    )
    shutil.rmtree(work / "env")
    return result, log


async def _build(
    folder: Path, work: Path, uv_cache: Path, **kwargs: object
) -> tuple[PackResult, Log]:
    log = Log()
    result = await build_pack(folder, work, uv_cache_dir=uv_cache, log=log, **kwargs)  # type: ignore[arg-type]
    return result, log


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _http(port: int, method: str, path: str, body: object = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _run_check(env: Path, cwd: Path) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [
            str(env / "bin" / "python"),
            "-m",
            "shipyard_runtime",
            "check",
            "--model-dir",
            str(env / "model"),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON result: stdout={proc.stdout!r} stderr={proc.stderr!r}"
    return proc.returncode, json.loads(lines[-1])


# --- builds -------------------------------------------------------------------------


async def test_iris_builds_checks_and_packs(
    iris_build: tuple[PackResult, Log], iris_folder: Path
) -> None:
    result, log = iris_build
    assert result.path.is_file() and result.path.name == "pack.tar.gz"
    assert result.size == result.path.stat().st_size > 1_000_000
    assert result.digest == hashlib.sha256(result.path.read_bytes()).hexdigest()
    requested = inspect_folder(iris_folder).python
    if requested is None:
        assert result.python_version == platform.python_version()
    else:
        assert result.python_version.startswith(requested + "."), result.python_version
    names = dict(result.packages)
    assert "scikit-learn" in names and "numpy" in names
    assert "shipyard-runtime" in names
    assert result.check is not None and result.check["ok"] is True
    assert result.check["stage"] == "predict"
    assert result.manifest["source_digest"] == result.source_digest
    assert result.manifest["python"] == result.python_version
    assert any(r.startswith("scikit-learn") for r in result.manifest["requirements"])
    assert result.unpacked_size > result.size
    # The build log: uv's own lines, the check, and where the time went.
    assert any("scikit-learn" in line and "+" in line for line in log.lines), log.text
    assert "timings: venv" in log.text and " pack " in log.text
    assert set(result.timings) >= {"venv", "install", "check", "pack", "total"}


async def test_same_folder_builds_to_the_same_digest(
    iris_build: tuple[PackResult, Log], iris_folder: Path, uv_cache: Path, tmp_path: Path
) -> None:
    first, _ = iris_build
    second, log = await _build(iris_folder, tmp_path / "again", uv_cache, python=None)
    assert second.digest == first.digest
    assert second.size == first.size
    assert second.packages == first.packages
    # The cache was warm: nothing was downloaded the second time.
    assert not any("Downloading" in line for line in log.lines), log.text


async def test_unpacked_env_runs_from_another_directory(
    iris_build: tuple[PackResult, Log], tmp_path: Path
) -> None:
    result, _ = iris_build
    dest = tmp_path / "somewhere" / "else" / "image"
    assert unpack(result.path, dest) == dest
    manifest = json.loads((dest / "model" / "shipyard.json").read_text())
    assert manifest == result.manifest
    assert (dest / "bin" / "python").is_symlink()
    code, check = _run_check(dest, cwd=tmp_path)
    assert code == 0, check
    assert check["ok"] is True and check["stage"] == "predict"
    # An unpacked env moves too: nothing in it refers to where it was unpacked.
    moved = tmp_path / "moved"
    dest.rename(moved)
    code, check = _run_check(moved, cwd=moved)
    assert code == 0 and check["ok"] is True


def test_unpacked_env_serves_predictions(
    iris_build: tuple[PackResult, Log], tmp_path: Path
) -> None:
    result, _ = iris_build
    dest = unpack(result.path, tmp_path / "served")
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            str(dest / "bin" / "python"),
            "-m",
            "shipyard_runtime",
            "serve",
            "--model-dir",
            str(dest / "model"),
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_clean_env(),
    )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the runtime exited: {(tmp_path / 'serve.log').read_text()}")
            return _http(port, "GET", "/v2/health/ready")[0] == 200

        wait_for_sync(
            ready,
            timeout=60,
            message="the unpacked runtime to be ready",
            ignore=(OSError,),
        )
        status, body = _http(port, "POST", "/predict", [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])
        assert status == 200, body
        prediction = json.loads(body)
        assert len(prediction) == 2 and prediction[0] != prediction[1], prediction
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def test_unknown_requirement_fails_with_the_resolution_message(
    tmp_path: Path, uv_cache: Path
) -> None:
    folder = make_folder(
        tmp_path / "m", {"serve.py": ECHO_SERVE, "requirements.txt": "torch==9.9\n"}
    )
    log = Log()
    with pytest.raises(FailedPrecondition) as info:
        await build_pack(folder, tmp_path / "w", uv_cache_dir=uv_cache, log=log)
    message = info.value.message
    assert message.startswith("installing the requirements failed:")
    assert "torch==9.9" in message and "unsatisfiable" in message
    assert "requirements.txt" in message
    # uv's full output is in the build log.
    assert "No solution found" in log.text
    assert not (tmp_path / "w" / "pack.tar.gz").exists()


async def test_predict_raising_fails_at_stage_predict(tmp_path: Path, uv_cache: Path) -> None:
    folder = make_folder(
        tmp_path / "m",
        {
            "serve.py": (
                "def load(model_dir):\n    return None\n\n\n"
                "def predict(model, payload):\n"
                "    raise ValueError(f'expected 4 features, got {len(payload[0])}')\n"
            ),
            "shipyard.yaml": "example_input: [[1, 2, 3]]\n",
        },
    )
    log = Log()
    with pytest.raises(FailedPrecondition) as info:
        await build_pack(folder, tmp_path / "w", uv_cache_dir=uv_cache, log=log)
    assert "stage predict" in info.value.message
    assert "ValueError: expected 4 features, got 3" in info.value.message
    # The traceback is kept in the build log, pointing into serve.py.
    assert "Traceback" in log.text and "serve.py" in log.text


async def test_a_hanging_load_is_stopped_at_the_check_timeout(
    tmp_path: Path, uv_cache: Path
) -> None:
    pid_file = tmp_path / "pid"
    folder = make_folder(
        tmp_path / "m",
        {
            "serve.py": (
                "import os, threading\n\n\n"
                "def load(model_dir):\n"
                f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                "    threading.Event().wait()\n\n\n"
                "def predict(model, payload):\n    return payload\n"
            )
        },
    )
    with pytest.raises(FailedPrecondition, match=r"did not finish within 3s"):
        await _build(folder, tmp_path / "w", uv_cache, check_timeout=3.0)
    pid = int(pid_file.read_text())
    # The check process was killed and reaped, not left behind.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_too_small_size_limit_refuses_the_pack(tmp_path: Path, uv_cache: Path) -> None:
    folder = make_folder(tmp_path / "m", {"serve.py": ECHO_SERVE})
    with pytest.raises(FailedPrecondition) as info:
        await _build(folder, tmp_path / "w", uv_cache, size_limit_bytes=100_000)
    message = info.value.message
    assert message.startswith("the environment is ")
    assert "over the 97.7 KiB limit; trim requirements or raise SHIPYARD_IMAGE_SIZE_LIMIT" in (
        message
    )
    assert not (tmp_path / "w" / "pack.tar.gz").exists()


async def test_install_dependencies_false_records_but_does_not_install(
    tmp_path: Path, uv_cache: Path
) -> None:
    # The requirement cannot be installed at all: a build that tried would fail.
    folder = make_folder(
        tmp_path / "m",
        {
            "serve.py": "import torch\n\n" + ECHO_SERVE,
            "requirements.txt": "torch==9.9\n",
            "shipyard.yaml": "install_dependencies: false\nexample_input: 1\n",
        },
    )
    result, log = await _build(folder, tmp_path / "w", uv_cache)
    assert [name for name, _ in result.packages] == ["shipyard-runtime"]
    assert result.manifest["requirements"] == ["torch==9.9"]
    assert result.manifest["install_dependencies"] is False
    assert result.check is None
    assert "recorded but not installed" in log.text
    assert "does not import it" in log.text
    # The same folder with installing turned back on by the caller fails to resolve.
    with pytest.raises(FailedPrecondition, match=re.escape("torch==9.9")):
        await _build(folder, tmp_path / "w2", uv_cache, install_dependencies=True)


async def test_install_dependencies_false_still_compiles_the_script(
    tmp_path: Path, uv_cache: Path
) -> None:
    folder = make_folder(
        tmp_path / "m",
        {"serve.py": "def load(model_dir)\n    return 1\n", "shipyard.yaml": ""},
    )
    with pytest.raises(FailedPrecondition, match=re.escape("serve.py does not compile")):
        await _build(folder, tmp_path / "w", uv_cache, install_dependencies=False)


async def test_a_missing_python_is_named_with_the_installed_ones(
    tmp_path: Path, uv_cache: Path
) -> None:
    folder = make_folder(
        tmp_path / "m", {"serve.py": ECHO_SERVE, "shipyard.yaml": 'python: "3.99"\n'}
    )
    with pytest.raises(FailedPrecondition) as info:
        await _build(folder, tmp_path / "w", uv_cache)
    message = info.value.message
    assert message.startswith("Python 3.99 is not installed on the build host; installed: ")
    assert platform.python_version() in message
    assert "set python: in shipyard.yaml" in message


async def test_a_bad_shipyard_yaml_names_the_field_before_building(
    tmp_path: Path, uv_cache: Path
) -> None:
    folder = make_folder(
        tmp_path / "m", {"serve.py": ECHO_SERVE, "shipyard.yaml": "workers: two\n"}
    )
    with pytest.raises(InvalidArgument) as info:
        await _build(folder, tmp_path / "w", uv_cache)
    assert info.value.message == (
        "shipyard.yaml: workers must be an integer >= 1, got 'two' (e.g. workers: 2)"
    )
    assert not (tmp_path / "w").exists()


# --- the model folder contract ---------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("workers: 0\n", "workers must be an integer >= 1, got 0"),
        ("workers: true\n", "workers must be an integer >= 1, got true"),
        ("wokers: 2\n", "unknown key 'wokers' (the keys are name, python,"),
        ("python: 3\n", "python must be a version like \"3.11\", got '3'"),
        ("python: [3]\n", 'python must be a version like "3.11", got [3]'),
        ("requirements: numpy\n", "requirements must be a list of requirement strings"),
        ("requirements: [--index-url=x]\n", "requirements holds pip options"),
        ("requirements_file: nope.txt\n", "requirements_file 'nope.txt' does not exist"),
        ("requirements_file: ../x.txt\n", "requirements_file must be a file name inside"),
        ("example_input: 2024-01-01\n", "example_input must be JSON"),
        ("example_input: {1: 2}\n", "example_input has a mapping with non-string keys"),
        ("readme: MISSING.md\n", "readme 'MISSING.md' does not exist (add the file or"),
        ("readme: /etc/passwd\n", "readme must name a file in the folder"),
        ("install_dependencies: maybe\n", "install_dependencies must be true or false"),
        ("name: Not_A_Name\n", "name must be 1-63 lowercase letters"),
        ("- a\n- b\n", "must be a mapping of settings, got list"),
        ("workers: [\n", "is not valid YAML"),
    ],
)
def test_shipyard_yaml_problems_are_named(tmp_path: Path, yaml_text: str, expected: str) -> None:
    folder = make_folder(tmp_path, {"serve.py": ECHO_SERVE, "shipyard.yaml": yaml_text})
    with pytest.raises(InvalidArgument) as info:
        inspect_folder(folder)
    assert info.value.field == "shipyard.yaml"
    assert info.value.message.startswith("shipyard.yaml: ")
    assert expected in info.value.message


def test_every_shipyard_yaml_problem_is_reported_at_once(tmp_path: Path) -> None:
    folder = make_folder(
        tmp_path, {"serve.py": ECHO_SERVE, "shipyard.yaml": "workers: 0\ncolour: red\n"}
    )
    with pytest.raises(InvalidArgument) as info:
        inspect_folder(folder)
    assert "unknown key 'colour'" in info.value.message
    assert "workers must be an integer >= 1, got 0" in info.value.message


def test_missing_serving_script_says_what_to_add(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {"model.joblib": "x", "requirements.txt": "numpy\n"})
    with pytest.raises(InvalidArgument) as info:
        inspect_folder(folder)
    assert info.value.message == (
        "model folder: neither serve.py nor score.py found "
        "(add serve.py with load(model_dir) and predict(model, payload))"
    )
    with pytest.raises(InvalidArgument, match="is not a folder"):
        inspect_folder(tmp_path / "nowhere")
    make_folder(tmp_path, {"serve.py": ECHO_SERVE, "shipyard.json": "{}"})
    with pytest.raises(InvalidArgument, match=re.escape("shipyard.json is reserved")):
        inspect_folder(folder)


def test_a_full_shipyard_yaml_resolves(tmp_path: Path) -> None:
    folder = make_folder(
        tmp_path,
        {
            "score.py": (
                "def load_model():\n    pass\n\n\ndef predict(data, model):\n    return data\n"
            ),
            "requirements.txt": "# pinned\nnumpy>=1.26  # arrays\n\nscikit-learn\\\n>=1.5\n",
            "extra.txt": "joblib\n",
            "NOTES.md": "# notes\n",
            "shipyard.yaml": (
                "name: iris\npython: 3.10\nrequirements: [pandas]\nrequirements_file: extra.txt\n"
                "workers: 3\nexample_input: null\nreadme: NOTES.md\ninstall_dependencies: false\n"
            ),
        },
    )
    model = inspect_folder(folder)
    assert model.entrypoint == model.script == "score.py" and model.style == "score"
    assert model.name == "iris"
    # YAML would read 3.10 as 3.1: the text as written wins.
    assert model.python == "3.10"
    assert model.requirements == ("numpy>=1.26", "scikit-learn>=1.5", "joblib", "pandas")
    assert model.requirement_files == (folder / "requirements.txt", folder / "extra.txt")
    assert model.inline_requirements == ("pandas",)
    assert model.workers == 3
    # null is no example, as the runtime reads it: predict() is not called at build time.
    assert not model.has_example_input
    assert model.readme == "NOTES.md"
    assert model.install_dependencies is False
    manifest = model.manifest(source_digest="d", python_version="3.10.1")
    assert "example_input" not in manifest and manifest["python"] == "3.10.1"
    assert manifest["workers"] == 3 and manifest["name"] == "iris"

    bare = inspect_folder(make_folder(tmp_path / "bare", {"serve.py": ECHO_SERVE}))
    assert (bare.name, bare.python, bare.requirements, bare.workers) == (None, None, (), 1)
    assert not bare.has_example_input and "example_input" not in bare.manifest(
        source_digest="d", python_version="3.11.7"
    )
    assert bare.readme is None and bare.install_dependencies is True


# --- digests and archives ----------------------------------------------------------------


def _files(root: Path) -> Path:
    return make_folder(
        root,
        {"serve.py": ECHO_SERVE, "model/weights.bin": "w" * 1000, "README.md": "# r\n"},
    )


def test_source_digest_depends_on_content_names_and_modes_only(tmp_path: Path) -> None:
    a = _files(tmp_path / "a")
    digest = source_digest(a)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    os.utime(b / "serve.py", (1, 1))
    # Caches and version control are not part of the model.
    make_folder(b, {"__pycache__/serve.cpython-311.pyc": "x", ".git/HEAD": "ref", "x.pyc": "y"})
    assert source_digest(b) == digest

    changes: list[Callable[[Path], object]] = [
        lambda p: (p / "model/weights.bin").write_text("w" * 999 + "x"),
        lambda p: (p / "README.md").rename(p / "README.txt"),
        lambda p: os.chmod(p / "serve.py", 0o755),  # noqa: S103
        lambda p: (p / "model/empty").write_text(""),
    ]
    for i, change in enumerate(changes):
        c = tmp_path / f"c{i}"
        shutil.copytree(a, c)
        change(c)
        assert source_digest(c) != digest, i


def test_source_archive_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    a = _files(tmp_path / "a")
    digest_1, size_1 = make_source_archive(a, tmp_path / "one.tar.gz")
    for path in a.rglob("*"):
        os.utime(path, (12345, 12345))
    digest_2, size_2 = make_source_archive(a, tmp_path / "two.tar.gz")
    assert (digest_1, size_1) == (digest_2, size_2)
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "two.tar.gz").read_bytes()
    assert digest_1 == hashlib.sha256((tmp_path / "one.tar.gz").read_bytes()).hexdigest()

    out = tmp_path / "out"
    extract_archive(tmp_path / "one.tar.gz", out)
    assert source_digest(out) == source_digest(a)


def _tar_with(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "members",
    [
        [(_info("/etc/evil"), b"x")],
        [(_info("../evil"), b"x")],
        [(_info("a/../../evil"), b"x")],
        [(_info("link", tarfile.SYMTYPE, "/etc/passwd"), None)],
        [(_info("link", tarfile.SYMTYPE, "../../outside"), None)],
        [(_info("dir", tarfile.SYMTYPE, "/var"), None), (_info("dir/evil"), b"x")],
        [(_info("hard", tarfile.LNKTYPE, "../outside"), None)],
        [(_info("dev", tarfile.CHRTYPE), None)],
        [(_info("fifo", tarfile.FIFOTYPE), None)],
    ],
)
def test_unsafe_archives_are_refused(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]
) -> None:
    archive = _tar_with(tmp_path, *members)
    dest = tmp_path / "dest"
    with pytest.raises(InvalidArgument) as info:
        extract_archive(archive, dest)
    assert info.value.field == "archive"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()


def test_archive_limits_and_garbage(tmp_path: Path) -> None:
    archive = _tar_with(tmp_path, (_info("big"), b"x" * 5000))
    with pytest.raises(
        FailedPrecondition, match=re.escape("unpacks to 4.9 KiB, over the 4 KiB limit")
    ):
        extract_archive(archive, tmp_path / "d", max_bytes=4096)
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(InvalidArgument, match=re.escape("is not a valid tar.gz")):
        extract_archive(tmp_path / "junk.tar.gz", tmp_path / "d")
    # Links inside the target are fine.
    ok = _tar_with(
        tmp_path, (_info("a/file"), b"data"), (_info("a/link", tarfile.SYMTYPE, "file"), None)
    )
    extract_archive(ok, tmp_path / "ok")
    assert (tmp_path / "ok" / "a" / "link").read_bytes() == b"data"


def test_unpack_names_a_missing_base_python(tmp_path: Path) -> None:
    pack = _tar_with(
        tmp_path,
        (_info("pyvenv.cfg"), b"home = /nonexistent/python/bin\nversion_info = 3.11.99\n"),
        (_info("bin", tarfile.DIRTYPE), None),
        (_info("bin/python", tarfile.SYMTYPE, "/nonexistent/python/bin/python3.11"), None),
    )
    with pytest.raises(FailedPrecondition, match=r"needs the Python in /nonexistent/python/bin"):
        unpack(pack, tmp_path / "env")


@pytest.mark.parametrize(
    "members",
    [
        [
            (_info("bin", tarfile.DIRTYPE), None),
            (_info("bin/up", tarfile.SYMTYPE, "../../x"), None),
        ],
        [(_info("../pyvenv.cfg"), b"home = /usr/bin\n")],
        [(_info("lib", tarfile.SYMTYPE, "/var"), None), (_info("lib/evil"), b"x")],
    ],
)
def test_unpack_refuses_escaping_entries(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]
) -> None:
    with pytest.raises(InvalidArgument, match="archive"):
        unpack(_tar_with(tmp_path, *members), tmp_path / "env")
    assert not (tmp_path / "x").exists() and not (tmp_path / "pyvenv.cfg").exists()


def test_cache_key_is_a_function_of_its_inputs() -> None:
    base = ("a" * 64, "3.11.7", True, "0.1.0+abc")
    assert cache_key(*base) == cache_key(*base)
    assert len(cache_key(*base)) == 64
    variants = [
        ("b" * 64, "3.11.7", True, "0.1.0+abc"),
        ("a" * 64, "3.11.8", True, "0.1.0+abc"),
        ("a" * 64, "3.11.7", False, "0.1.0+abc"),
        ("a" * 64, "3.11.7", True, "0.1.0+abd"),
    ]
    assert len({cache_key(*v) for v in [base, *variants]}) == 5


def test_runtime_version_follows_the_runtime_source(tmp_path: Path) -> None:
    source = envpack.default_runtime_source()
    assert (source / "src" / "shipyard_runtime" / "__init__.py").is_file()
    version = envpack.runtime_version(source)
    assert version == envpack.runtime_version()
    copy = tmp_path / "runtime"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert envpack.runtime_version(copy) == version
    (copy / "src" / "shipyard_runtime" / "extra.py").write_text("X = 1\n")
    assert envpack.runtime_version(copy) != version
    assert version.startswith("0.") and "+" in version


def test_sizes_read_like_the_messages_say() -> None:
    assert format_size(1 << 30) == "1 GiB"
    assert format_size(int(1.3 * (1 << 30))) == "1.3 GiB"
    assert format_size(512 * 1024 * 1024) == "512 MiB"
    assert format_size(999) == "999 B"
