"""Cluster builds (adapters/kaniko.py), tested as far as a machine without a cluster allows.

- The Job, ConfigMap and RBAC manifests are validated against the Kubernetes OpenAPI
  schemas shipped by kubernetes-validate, in strict mode (an unknown or misspelt field
  fails), and their important fields are asserted.
- The Dockerfile is checked against the build context write_context() makes. Its install
  and check steps are run as written on this host (a Python 3.11 venv in place of the
  python:3.11-slim base image, real pip, the real runtime wheel): iris passes the check,
  a model whose predict() raises fails it. No container is built: there is no Docker
  daemon or Kaniko here, so the base image, COPY, USER and the push are not exercised.
- KubernetesBuildRunner runs the real kubernetes client against ``FakeKubeAPI``
  (``shipyard_testing.fake_kube``, shared with the scheduler's tests): a small HTTP server
  on 127.0.0.1 that answers the few REST paths the runner uses, with canned
  JSON, and records every request. It is NOT a Kubernetes API server and NOT a cluster: it
  proves the verbs, paths, query parameters and bodies the client sends and how the runner
  reads the answers; it cannot prove that a cluster admits the Job, that Kaniko builds the
  image, or that the image serves.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s
from uv import find_uv_bin

from shipyard_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from shipyard_imagebuild.adapters import kaniko
from shipyard_imagebuild.adapters.folder import inspect_folder
from shipyard_imagebuild.adapters.kaniko import (
    KanikoBuild,
    KubernetesBuildRunner,
    config_map_manifest,
    dockerfile,
    job_manifest,
    to_dict,
    write_context,
)
from shipyard_testing import fake_kube
from shipyard_testing.fake_kube import now, rbac_attributes

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_IRIS = REPO / "examples" / "iris"
RBAC_YAML = REPO / "infra" / "k8s" / "imagebuild-rbac.yaml"
NS = "shipyard-builds"
# The oldest Kubernetes the manifests are meant for, and the newest the installed
# kubernetes-validate knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
DIGEST = "sha256:" + "ab" * 32
ECHO_SERVE = """\
def load(model_dir):
    return 1


def predict(model, payload):
    return payload
"""


def make_build(**overrides: Any) -> KanikoBuild:
    values: dict[str, Any] = {
        "build_id": "b-0123456789abcdef",
        "group": "team-a",
        "name": "iris",
        "version": 3,
        "source_url": "s3://shipyard/contexts/b-0123456789abcdef.tar.gz",
        "destination": "registry.example/team-a/iris:3",
        "pull_secret": "registry-login",
        "cache_repo": "registry.example/cache/iris",
    }
    values.update(overrides)
    return KanikoBuild(**values)


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"source_url": "https://store.example/ctx.tar.gz?sig=1", "pull_secret": None},
        {"cache_repo": None, "install_dependencies": False, "ephemeral_storage": "20Gi"},
    ],
    ids=["s3-with-secret", "https-no-secret", "no-cache-repo-no-deps"],
)
def test_job_and_config_map_validate_strictly(version: str, overrides: dict[str, Any]) -> None:
    build = make_build(**overrides)
    for manifest in (
        to_dict(job_manifest(build)),
        to_dict(config_map_manifest(build)),
        to_dict(config_map_manifest(build, owner_uid=str(uuid.uuid4()))),
    ):
        kubernetes_validate.validate(manifest, version, strict=True)


def test_strict_validation_catches_a_misspelt_field() -> None:
    # Proves the check above has teeth: strict schemas refuse unknown fields.
    job = to_dict(job_manifest(make_build()))
    job["spec"]["backofLimit"] = 0
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


def test_job_fields() -> None:
    build = make_build()
    job = to_dict(job_manifest(build))
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    meta = job["metadata"]
    assert meta["name"] == "shipyard-build-b-0123456789abcdef"
    assert meta["namespace"] == NS
    labels = {
        "app.kubernetes.io/part-of": "shipyard",
        "app.kubernetes.io/component": "image-build",
        "shipyard.io/build-id": "b-0123456789abcdef",
        "shipyard.io/group": "team-a",
        "shipyard.io/image": "iris",
        "shipyard.io/image-version": "3",
    }
    assert meta["labels"] == labels
    assert meta["annotations"]["shipyard.io/image-ref"] == "team-a/iris:3"

    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 1800
    assert spec["ttlSecondsAfterFinished"] == 86400
    template = spec["template"]
    assert template["metadata"]["labels"] == labels  # logs() finds the pod by them
    pod = template["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "shipyard-builder"
    assert pod["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "registry-login"}]
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}

    c = container_of(job)
    assert c["name"] == "kaniko"
    assert c["image"] == "gcr.io/kaniko-project/executor:v1.23.2"
    assert c["args"] == [
        "--context=s3://shipyard/contexts/b-0123456789abcdef.tar.gz",
        "--dockerfile=/shipyard/Dockerfile",
        "--destination=registry.example/team-a/iris:3",
        "--cache=true",
        "--cache-repo=registry.example/cache/iris",
        "--digest-file=/dev/termination-log",
    ]
    assert c["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    }
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    sc = c["securityContext"]
    assert sc["runAsUser"] == 0 and sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) <= {
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "SETFCAP",
        "SETGID",
        "SETUID",
    }

    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert set(env) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "S3_ENDPOINT",
        "S3_FORCE_PATH_STYLE",
    }
    assert all(ref["name"] == "shipyard-object-store" for ref in env.values())
    assert all(ref["key"] == name for name, ref in env.items())

    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dockerfile"]["configMap"]["name"] == meta["name"]
    docker = volumes["docker-config"]["secret"]
    assert docker["secretName"] == "registry-login"
    assert docker["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    assert docker["defaultMode"] == 0o400
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"dockerfile": "/shipyard", "docker-config": "/kaniko/.docker"}


def test_job_for_https_context_without_pull_secret_or_cache_repo() -> None:
    build = make_build(
        source_url="https://store.example/ctx.tar.gz?X-Amz-Signature=x",
        pull_secret=None,
        cache_repo=None,
        cpu="500m",
        memory="4Gi",
        timeout_seconds=600,
    )
    job = to_dict(job_manifest(build))
    c = container_of(job)
    assert "env" not in c  # a presigned URL needs no object store credentials
    assert "--context=https://store.example/ctx.tar.gz?X-Amz-Signature=x" in c["args"]
    assert "--cache=true" in c["args"]
    assert not any(a.startswith("--cache-repo") for a in c["args"])
    assert "imagePullSecrets" not in job["spec"]["template"]["spec"]
    assert [v["name"] for v in job["spec"]["template"]["spec"]["volumes"]] == ["dockerfile"]
    assert c["resources"]["limits"] == {"cpu": "500m", "memory": "4Gi"}
    assert job["spec"]["activeDeadlineSeconds"] == 600


def test_config_map_holds_the_dockerfile_and_can_be_owned_by_the_job() -> None:
    build = make_build()
    cm = to_dict(config_map_manifest(build))
    assert cm["metadata"]["name"] == build.job_name
    assert cm["metadata"]["labels"]["shipyard.io/build-id"] == build.build_id
    assert cm["data"] == {"Dockerfile": dockerfile("3.11")}
    assert cm["immutable"] is True
    assert "ownerReferences" not in cm["metadata"]
    owned = to_dict(config_map_manifest(build, owner_uid="1234"))
    assert owned["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": build.job_name, "uid": "1234"}
    ]
    no_deps = to_dict(config_map_manifest(replace(build, install_dependencies=False)))
    assert no_deps["data"]["Dockerfile"] == dockerfile("3.11", check=False)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"build_id": "B_1"}, "build_id"),
        ({"build_id": "b-" + "0" * 47}, "build_id"),  # the Job name would pass 63 chars
        ({"group": "Team A"}, "group"),
        ({"name": "iris:1"}, "name"),
        ({"version": 0}, "version"),
        ({"source_url": "file:///tmp/ctx.tar.gz"}, "source_url"),
        ({"destination": "registry.example/iris:1 --insecure"}, "destination"),
        ({"destination": "https://registry.example/iris:1"}, "destination"),
        ({"python": "3.11-slim\nRUN curl evil"}, "python"),
        ({"memory": "2 GB"}, "memory"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
    ],
)
def test_build_refuses_bad_values(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        make_build(**overrides)
    assert err.value.field == field


# --------------------------------------------------------------------------- RBAC


def test_rbac_manifests_validate_strictly() -> None:
    docs = [d for d in yaml.safe_load_all(RBAC_YAML.read_text()) if d]
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    builder = by_kind[("ServiceAccount", "shipyard-builder")]
    assert builder["metadata"]["namespace"] == NS
    assert builder["automountServiceAccountToken"] is False
    assert by_kind[("ServiceAccount", "imagebuild")]["metadata"]["namespace"] == "shipyard"
    role = by_kind[("Role", "imagebuild-builds")]
    assert role["metadata"]["namespace"] == NS
    binding = by_kind[("RoleBinding", "imagebuild-builds")]
    assert binding["metadata"]["namespace"] == NS
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "imagebuild-builds",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "imagebuild", "namespace": "shipyard"}
    ]
    namespace = by_kind[("Namespace", NS)]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
    # The Job's pods run as the builder account in the namespace the Role covers.
    pod = to_dict(job_manifest(make_build()))["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "shipyard-builder"


def _role_rules() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(RBAC_YAML.read_text()) if d]
    (role,) = [d for d in docs if d["kind"] == "Role"]
    return list(role["rules"])


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_like_a_local_build() -> None:
    text = dockerfile("3.12")
    lines = text.splitlines()
    assert "FROM python:3.12-slim" in lines
    check = "RUN python -m shipyard_runtime check --model-dir /model"
    assert check in lines
    assert "USER 10001:10001" in lines
    # Code of the model's runs as the unprivileged user only: its requirements' build
    # scripts (pip install) and the check that imports it; nothing after USER is root.
    user = lines.index("USER 10001:10001")
    install = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert user < install < lines.index(check)
    assert not any(line.startswith("USER") for line in lines[user + 1 :])
    assert "pip install" not in "\n".join(lines[:user])
    # ... into a virtual environment that user owns, first on PATH.
    assert "chown -R 10001:10001 /opt/shipyard" in text
    assert "ENV PATH=/opt/shipyard/bin:$PATH" in lines
    assert "useradd --system --uid 10001" in text
    cmd = next(line for line in lines if line.startswith("CMD "))
    assert json.loads(cmd.removeprefix("CMD ")) == [
        "/opt/shipyard/bin/python",
        "-m",
        "shipyard_runtime",
        "serve",
        "--model-dir",
        "/model",
        "--port",
        "8080",
        "--host",
        "0.0.0.0",  # noqa: S104 - the container's server, as the image must run it
    ]
    assert "EXPOSE 8080" in lines
    with pytest.raises(InvalidArgument):
        dockerfile("3.11 AS evil")


def _instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [ln for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize("with_requirements", [True, False])
def test_dockerfile_install_step_runs_one_pip_call(tmp_path: Path, with_requirements: bool) -> None:
    # The RUN step's shell as written, with the user's home moved to a scratch folder and
    # a `pip` on PATH that records its arguments.
    (run,) = [i for i in _instructions(dockerfile("3.11")) if "pip install" in i]
    build = tmp_path / "build"
    build.mkdir()
    (build / "shipyard_runtime-0.1.0-py3-none-any.whl").write_bytes(b"wheel")
    if with_requirements:
        (build / "requirements.txt").write_text("scikit-learn>=1.5\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/pip-args\n')
    (bin_dir / "pip").chmod(0o755)
    script = run.removeprefix("RUN ").replace("/home/shipyard", str(build))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["/bin/sh", "-c", script], check=True, env=env)
    args = (tmp_path / "pip-args").read_text().split()
    assert args == [
        "install",
        "-r",
        f"{build}/requirements.txt",
        f"{build}/shipyard_runtime-0.1.0-py3-none-any.whl",
    ]
    assert list(build.iterdir()) == []  # the wheel and requirements stay out of the image


def test_dockerfile_without_dependencies_only_compiles(tmp_path: Path) -> None:
    text = dockerfile("3.11", check=False)
    assert "shipyard_runtime check" not in text
    (run,) = [i for i in _instructions(text) if i.startswith('RUN ["python"')]
    argv = json.loads(run.removeprefix("RUN "))
    code = argv[2].replace("/model/", f"{tmp_path}/")
    (tmp_path / "score.py").write_text("def load_model():\n    return 1\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    (tmp_path / "serve.py").write_text("def load(:\n")  # serve.py wins over score.py
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert bad.returncode != 0 and "SyntaxError" in bad.stderr


# --------------------------------------------------------------------------- context


def _wheel(tmp_path: Path) -> Path:
    wheel = tmp_path / "shipyard_runtime-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    return wheel


def _members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_context_has_the_layout_the_dockerfile_copies(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    digest, size = write_context(EXAMPLE_IRIS, wheel, tmp_path / "ctx.tar.gz", python="3.11")
    assert size == (tmp_path / "ctx.tar.gz").stat().st_size
    # Deterministic: the same folder gives the same bytes (and so the same upload key).
    again, _ = write_context(EXAMPLE_IRIS, wheel, tmp_path / "ctx2.tar.gz", python="3.11")
    assert again == digest

    members = _members(tmp_path / "ctx.tar.gz")
    assert {"model/serve.py", "model/model.joblib", "model/shipyard.json"} <= set(members)
    assert members["model"].isdir()
    model = inspect_folder(EXAMPLE_IRIS)
    with tarfile.open(tmp_path / "ctx.tar.gz") as tar:
        requirements = tar.extractfile("requirements.txt")
        manifest_file = tar.extractfile("model/shipyard.json")
        assert requirements is not None and manifest_file is not None
        assert requirements.read().decode().splitlines() == list(model.requirements)
        manifest = json.loads(manifest_file.read())
    assert manifest["python"] == "3.11"
    assert manifest["example_input"] == [[5.1, 3.5, 1.4, 0.2]]  # so the check predicts

    # Every COPY source of the Dockerfile matches what the context holds.
    names = set(members)
    for instruction in _instructions(dockerfile("3.11")):
        if not instruction.startswith("COPY "):
            continue
        *sources, _dest = [w for w in instruction.split()[1:] if not w.startswith("--")]
        matched = [s for s in sources if any(fnmatch.fnmatch(n, s.rstrip("/")) for n in names)]
        assert matched, instruction
        assert all(fnmatch.filter(names, s.rstrip("/")) for s in sources), instruction


def test_context_without_dependencies_installs_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "serve.py").write_text(ECHO_SERVE)
    (folder / "shipyard.yaml").write_text("install_dependencies: false\nrequirements: [numpy]\n")
    write_context(folder, _wheel(tmp_path), tmp_path / "ctx.tar.gz", python="3.12")
    assert "shipyard_runtime-0.1.0-py3-none-any.whl" in _members(tmp_path / "ctx.tar.gz")
    with tarfile.open(tmp_path / "ctx.tar.gz") as tar:
        requirements = tar.extractfile("requirements.txt")
        assert requirements is not None
        # Nothing for pip to install: numpy is recorded in shipyard.json, not installed.
        text = requirements.read().decode()
        assert text == "# no requirements to install (install_dependencies is false)\n"


@pytest.mark.parametrize(
    ("line", "refused"),
    [
        ("-r more.txt", True),
        ("--constraint=constraints.txt", True),
        ("-e .", True),
        ("--find-links ./wheels", True),
        ("./vendored/pkg", True),
        ("mypkg @ file:///wheels/mypkg.whl", True),
        ("numpy>=1.26", False),
        ("--extra-index-url https://download.pytorch.org/whl/cpu", False),
        ("-e git+https://example.com/pkg.git#egg=pkg", False),
        ("pkg @ https://example.com/pkg-1.0-py3-none-any.whl", False),
    ],
)
def test_context_refuses_requirements_that_name_local_files(
    tmp_path: Path, line: str, refused: bool
) -> None:
    # The context carries the resolved lines in one requirements.txt at its root, where a
    # path relative to the model folder would not resolve.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "serve.py").write_text(ECHO_SERVE)
    (folder / "requirements.txt").write_text(f"pandas\n{line}\n")
    dest = tmp_path / "ctx.tar.gz"
    if refused:
        with pytest.raises(InvalidArgument, match="requirements"):
            write_context(folder, _wheel(tmp_path), dest, python="3.11")
        return
    write_context(folder, _wheel(tmp_path), dest, python="3.11")
    with tarfile.open(dest) as tar:
        requirements = tar.extractfile("requirements.txt")
        assert requirements is not None
        assert requirements.read().decode() == f"pandas\n{line}\n"


def test_context_refuses_a_file_that_is_not_the_runtime_wheel(tmp_path: Path) -> None:
    not_a_wheel = tmp_path / "runtime.zip"
    not_a_wheel.write_bytes(b"")
    with pytest.raises(InvalidArgument, match="runtime_wheel"):
        write_context(EXAMPLE_IRIS, not_a_wheel, tmp_path / "ctx.tar.gz", python="3.11")


# The Dockerfile's steps on this host ------------------------------------------------


@pytest.fixture(scope="module")
def runtime_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    runtime = REPO / "libs" / "runtime"
    command = [find_uv_bin(), "build", "--wheel", "-q", str(runtime), "-o", str(out)]
    subprocess.run(command, check=True)
    (wheel,) = out.glob("shipyard_runtime-*.whl")
    return wheel


def test_dockerfile_steps_pass_iris_and_fail_a_broken_model(
    tmp_path: Path, runtime_wheel: Path
) -> None:
    """The Dockerfile's install and check steps, as written, on this host: a Python 3.11
    venv stands in for the image's /opt/shipyard, a folder for the user's home and /model.
    No container and no Kaniko are involved; what this proves is that the context
    write_context() makes, the one pip call and the check step agree (the real wheel, the
    real requirements, the shipyard.json that makes the check call predict())."""
    venv = tmp_path / "venv"
    subprocess.run(
        [find_uv_bin(), "venv", "--quiet", "--seed", "--python", "3.11", str(venv)], check=True
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    steps = _instructions(dockerfile("3.11"))
    (install,) = [i.removeprefix("RUN ") for i in steps if "pip install" in i]
    (check,) = [i.removeprefix("RUN ") for i in steps if "shipyard_runtime check" in i]

    def build(folder: Path, name: str) -> subprocess.CompletedProcess[str]:
        context = tmp_path / name
        write_context(folder, runtime_wheel, tmp_path / f"{name}.tar.gz", python="3.11")
        with tarfile.open(tmp_path / f"{name}.tar.gz") as tar:
            tar.extractall(context, filter="data")
        # COPY --chown=... shipyard_runtime-*.whl requirements.tx[t] /home/shipyard/
        staging = tmp_path / f"{name}-build"
        staging.mkdir()
        for item in [*context.glob("shipyard_runtime-*.whl"), context / "requirements.txt"]:
            shutil.copy(item, staging)
        subprocess.run(
            ["/bin/sh", "-c", install.replace("/home/shipyard", str(staging))],
            check=True,
            env=env,
            capture_output=True,
        )
        command = check.replace("/model", str(context / "model"))
        return subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True)

    good = build(EXAMPLE_IRIS, "iris")
    assert good.returncode == 0, good.stderr
    verdict = json.loads(good.stdout)
    assert verdict["ok"] is True and verdict["stage"] == "predict"
    assert verdict["prediction"] == ["setosa"]

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "serve.py").write_text(
        "def load(model_dir):\n    return None\n\n\n"
        "def predict(model, payload):\n"
        "    raise ValueError('expected 4 features, got 3')\n"
    )
    (broken / "shipyard.yaml").write_text("example_input: [[1, 2, 3]]\n")
    bad = build(broken, "broken")
    assert bad.returncode != 0  # a RUN step that exits non-zero fails the image build
    verdict = json.loads(bad.stdout)
    assert verdict["ok"] is False
    assert "expected 4 features, got 3" in json.dumps(verdict)


# --------------------------------------------------------------------------- fake API


@dataclass
class FakeKubeAPI(fake_kube.FakeKubeAPI):
    """The shared fake (shipyard_testing.fake_kube) serving the build namespace, whose
    reads of Jobs add ``job_status[name]`` (the fake runs no Job controller)."""

    namespace: str = NS
    job_status: dict[str, dict[str, Any]] = field(default_factory=dict)

    def on_read(self, resource: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        if resource == "jobs" and name in self.job_status:
            obj["status"] = self.job_status[name]
        return obj


@pytest.fixture
def fake_api() -> Iterator[tuple[FakeKubeAPI, KubernetesBuildRunner]]:
    api = FakeKubeAPI()
    with fake_kube.serve(api) as url:
        client = k8s.ApiClient(k8s.Configuration(host=url))
        try:
            yield api, KubernetesBuildRunner(client, NS)
        finally:
            client.close()


JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
CONFIG_MAPS = f"/api/v1/namespaces/{NS}/configmaps"
PODS = f"/api/v1/namespaces/{NS}/pods"


def _pod(
    name: str,
    build_id: str,
    *,
    phase: str,
    created: str,
    terminated: dict[str, Any] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if terminated is not None:
        status["containerStatuses"] = [
            {
                "name": "kaniko",
                "image": "gcr.io/kaniko-project/executor:v1.23.2",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "creationTimestamp": created,
            "labels": {"shipyard.io/build-id": build_id},
        },
        "spec": {"containers": [{"name": "kaniko", "image": "executor"}]},
        "status": status,
    }


# --------------------------------------------------------------------------- runner


def test_submit_posts_the_job_then_its_config_map(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    api, runner = fake_api
    build = make_build()
    assert runner.submit(build) == "shipyard-build-b-0123456789abcdef"
    assert api.calls() == [("POST", JOBS), ("POST", CONFIG_MAPS)]
    job_post, cm_post = api.requests
    assert job_post.body == to_dict(job_manifest(build))
    uid = api.objects[("jobs", build.job_name)]["metadata"]["uid"]
    # The ConfigMap is owned by the Job the server just created.
    assert cm_post.body == to_dict(config_map_manifest(build, owner_uid=uid))


def test_submit_again_is_idempotent(fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner]) -> None:
    api, runner = fake_api
    build = make_build()
    runner.submit(build)
    uid = api.objects[("jobs", build.job_name)]["metadata"]["uid"]
    api.requests.clear()
    assert runner.submit(build) == build.job_name
    # 409 for the Job, which is read to check it is this build's, then 409 for the map.
    assert api.calls() == [
        ("POST", JOBS),
        ("GET", f"{JOBS}/{build.job_name}"),
        ("POST", CONFIG_MAPS),
    ]
    assert api.requests[2].body["metadata"]["ownerReferences"][0]["uid"] == uid
    assert len(api.objects) == 2


def test_submit_resumes_after_a_crash_between_job_and_config_map(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    api, runner = fake_api
    build = make_build()
    job = to_dict(job_manifest(build))
    job["metadata"]["uid"] = "uid-from-before"
    api.objects[("jobs", build.job_name)] = job
    runner.submit(build)
    cm = api.objects[("configmaps", build.job_name)]
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-from-before"


def test_submit_refuses_someone_elses_job_and_one_being_deleted(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    api, runner = fake_api
    build = make_build()
    job = to_dict(job_manifest(build))
    job["metadata"]["labels"]["shipyard.io/build-id"] = "b-other"
    job["metadata"]["uid"] = "x"
    api.objects[("jobs", build.job_name)] = job
    with pytest.raises(AlreadyExists, match="b-other"):
        runner.submit(build)
    job["metadata"]["labels"]["shipyard.io/build-id"] = build.build_id
    job["metadata"]["deletionTimestamp"] = now()
    with pytest.raises(Unavailable, match="being deleted"):
        runner.submit(build)
    assert ("configmaps", build.job_name) not in api.objects


def test_submit_removes_the_job_when_its_config_map_fails(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    api, runner = fake_api
    build = make_build()
    api.fail[("POST", "configmaps")] = 403
    with pytest.raises(FailedPrecondition, match=r"imagebuild-rbac\.yaml"):
        runner.submit(build)
    assert api.calls() == [
        ("POST", JOBS),
        ("POST", CONFIG_MAPS),
        ("DELETE", f"{JOBS}/{build.job_name}"),
    ]
    assert api.requests[-1].query["propagationPolicy"] == ["Background"]
    assert not api.objects
    del api.fail[("POST", "configmaps")]
    runner.submit(build)  # a retry starts clean
    assert len(api.objects) == 2


def test_submit_checks_the_namespace(fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner]) -> None:
    api, runner = fake_api
    with pytest.raises(InvalidArgument, match="namespace"):
        runner.submit(make_build(namespace="default"))
    assert not api.requests


def _condition(kind: str, status: str = "True") -> dict[str, Any]:
    return {"type": kind, "status": status, "lastTransitionTime": now()}


@pytest.mark.parametrize(
    ("job_status", "expected"),
    [
        ({}, "pending"),
        ({"active": 1, "ready": 0}, "pending"),
        ({"active": 1, "ready": 1}, "running"),
        ({"active": 1}, "running"),  # a cluster too old to report ready
        ({"succeeded": 1}, "succeeded"),
        ({"succeeded": 1, "conditions": [_condition("Complete")]}, "succeeded"),
        ({"conditions": [_condition("SuccessCriteriaMet")], "active": 1}, "succeeded"),
        ({"failed": 1}, "failed"),
        ({"failed": 1, "conditions": [_condition("Failed")]}, "failed"),
        ({"conditions": [_condition("FailureTarget")], "active": 1, "ready": 1}, "failed"),
        ({"conditions": [_condition("Failed", "False")], "active": 1, "ready": 1}, "running"),
    ],
)
def test_status_maps_the_job(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
    job_status: dict[str, Any],
    expected: str,
) -> None:
    api, runner = fake_api
    build = make_build()
    runner.submit(build)
    api.job_status[build.job_name] = job_status
    assert runner.status(build.build_id) == expected
    assert api.calls()[-1] == ("GET", f"{JOBS}/{build.job_name}")


def test_status_of_an_unknown_build_is_not_found(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    _, runner = fake_api
    with pytest.raises(NotFound):
        runner.status("b-missing")


def test_logs_read_the_newest_pod_of_the_build(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    api, runner = fake_api
    build = make_build()
    api.pods = [
        _pod("old", build.build_id, phase="Failed", created="2025-01-01T10:00:00Z"),
        _pod("new", build.build_id, phase="Running", created="2025-01-01T10:05:00Z"),
        _pod("other", "b-other", phase="Running", created="2025-01-01T11:00:00Z"),
    ]
    # A log that is one JSON document must come back as written, not parsed and re-printed.
    log = '{"ok": false, "error": "predict() raised ValueError"}'
    api.logs = {"old": "old attempt\n", "new": log, "other": "not ours\n"}
    assert runner.logs(build.build_id) == log
    listing, read = api.requests
    assert (listing.method, listing.path) == ("GET", PODS)
    assert listing.query["labelSelector"] == ["shipyard.io/build-id=b-0123456789abcdef"]
    assert (read.method, read.path) == ("GET", f"{PODS}/new/log")
    assert read.query["container"] == ["kaniko"]

    api.requests.clear()
    api.logs["new"] = "INFO[0001] step 1\nINFO[0002] step 2 \u2713\n"
    assert runner.logs(build.build_id, tail_lines=50) == api.logs["new"]
    assert api.requests[-1].query["tailLines"] == ["50"]


def test_logs_are_empty_before_the_pod_starts(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    api, runner = fake_api
    assert runner.logs("b-0123456789abcdef") == ""  # no pod yet
    api.pods = [_pod("p", "b-0123456789abcdef", phase="Pending", created=now())]
    assert runner.logs("b-0123456789abcdef") == ""
    assert all(r.path == PODS for r in api.requests)  # no log read for a waiting pod


def test_image_digest_comes_from_the_termination_message(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    api, runner = fake_api
    bid = "b-0123456789abcdef"
    api.pods = [_pod("p", bid, phase="Running", created=now())]
    assert runner.image_digest(bid) is None
    failed = {"exitCode": 1, "message": "error building image: exit status 1"}
    api.pods = [_pod("p", bid, phase="Failed", created=now(), terminated=failed)]
    assert runner.image_digest(bid) is None
    done = {"exitCode": 0, "message": DIGEST + "\n"}
    api.pods = [_pod("p", bid, phase="Succeeded", created=now(), terminated=done)]
    assert runner.image_digest(bid) == DIGEST


def test_delete_removes_job_and_config_map_and_is_idempotent(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    api, runner = fake_api
    build = make_build()
    runner.submit(build)
    api.requests.clear()
    runner.delete(build.build_id)
    assert api.calls() == [
        ("DELETE", f"{JOBS}/{build.job_name}"),
        ("DELETE", f"{CONFIG_MAPS}/{build.job_name}"),
    ]
    # Background propagation: the pod goes with the Job (the API's default orphans it).
    assert api.requests[0].query["propagationPolicy"] == ["Background"]
    assert not api.objects
    runner.delete(build.build_id)  # both 404 now: nothing to do
    with pytest.raises(NotFound):
        runner.status(build.build_id)


def test_api_errors_become_shipyard_errors(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    api, runner = fake_api
    api.fail[("POST", "jobs")] = 503
    with pytest.raises(Unavailable, match="injected 503"):
        runner.submit(make_build())
    api.fail[("POST", "jobs")] = 422
    with pytest.raises(FailedPrecondition, match="rejected creating Job"):
        runner.submit(make_build())


def test_unreachable_api_server_is_unavailable() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens on the port any more
    config = k8s.Configuration(host=f"http://127.0.0.1:{port}")
    config.retries = 0
    with (
        k8s.ApiClient(config) as client,
        pytest.raises(Unavailable, match="cannot reach the Kubernetes API"),
    ):
        KubernetesBuildRunner(client, NS).status("b-1")


def test_every_call_the_runner_makes_is_allowed_by_the_role(
    fake_api: tuple[FakeKubeAPI, KubernetesBuildRunner],
) -> None:
    api, runner = fake_api
    build = make_build()
    runner.submit(build)
    runner.submit(build)
    api.pods = [_pod("p", build.build_id, phase="Running", created=now())]
    api.logs = {"p": "building\n"}
    runner.status(build.build_id)
    runner.logs(build.build_id)
    runner.image_digest(build.build_id)
    runner.delete(build.build_id)
    rules = _role_rules()
    seen = set()
    for r in api.requests:
        ns, group, resource, verb = rbac_attributes(r.method, r.path)
        assert ns == NS
        assert any(
            group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
            for rule in rules
        ), (r.method, r.path)
        seen.add((group, resource, verb))
    assert ("", "pods/log", "get") in seen and ("batch", "jobs", "create") in seen


def test_module_exports() -> None:
    assert set(kaniko.__all__) <= set(dir(kaniko))


def test_to_dict_is_the_wire_form() -> None:
    job = job_manifest(make_build())
    data = to_dict(job)
    assert json.loads(json.dumps(data)) == data
    assert "backoffLimit" in data["spec"] and "backoff_limit" not in data["spec"]
    buf = io.StringIO()
    yaml.safe_dump(data, buf)  # plain data: kubectl-ready as YAML too
    assert yaml.safe_load(buf.getvalue()) == data
