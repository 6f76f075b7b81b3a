"""Cluster builds through the service (SHIPYARD_BUILD_BACKEND=kubernetes), end to end as
far as a machine without a cluster allows.

Real: gRPC, PostgreSQL, NATS JetStream, the builder, the object store (S3 served by a moto
server on loopback), the build context, the official kubernetes client and the
KubernetesBuildRunner. Fake: the Kubernetes API (``ClusterAPI``, the shared
``shipyard_testing.fake_kube`` server plus a scripted stand-in for the Job controller and
the kubelet: a Job's reads walk it from pending through running to succeeded or failed,
its pod writes its log a few lines at a time, and a finished pod carries the termination
message Kaniko's ``--digest-file`` makes). No Kaniko runs and nothing is pushed: these
tests prove the service's half of the conversation (context upload, Job submission,
polling, log copying, digest, events, catalog, cleanup), not that a cluster builds the
image.
"""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import grpc
import pytest
import yaml
from kubernetes import client as k8s
from pydantic import ValidationError

from shipyard.imagebuild.v1 import imagebuild_pb2 as pb
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc
from shipyard_core import db
from shipyard_core.eventstore import EventStore, NewEvent, ensure_schema
from shipyard_core.grpckit.server import ServiceHost
from shipyard_imagebuild.adapters import kaniko
from shipyard_imagebuild.app.backends import (
    KanikoBackend,
    failure_reason,
    new_log_lines,
    pip_installed,
)
from shipyard_imagebuild.app.commands import pack_cache_key
from shipyard_imagebuild.domain import IMAGEBUILD_UPCASTERS
from shipyard_imagebuild.main import build
from shipyard_imagebuild.projections import SCHEMA, CatalogProjection
from shipyard_imagebuild.settings import (
    DEFAULT_BUILD_NAMESPACE,
    DEFAULT_KANIKO_IMAGE,
    ImageBuildSettings,
    settings_error,
)
from shipyard_testing import StaticAuthenticator, fake_kube, wait_for

from .test_service import EXAMPLES, TOKENS, _finished, _md, _start, _tar

NS = "shipyard-builds"
REGISTRY = "registry.example.com/shipyard"
DIGEST = "sha256:" + "5e" * 32
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"

# What a Kaniko build of iris prints (abridged); the fake pod writes it in three parts.
IRIS_LOG = [
    "INFO[0000] Retrieving image manifest python:3.11-slim",
    "INFO[0004] Unpacking rootfs as cmd RUN groupadd --system --gid 10001 shipyard requires it.",
    "INFO[0011] RUN touch /tmp/build/requirements.txt && pip install -r requirements.txt",
    "Successfully installed joblib-1.4.2 numpy-2.1.1 scikit-learn-1.5.2 scipy-1.14.1 "
    "shipyard-runtime-0.1.0 threadpoolctl-3.5.0",
    "INFO[0052] RUN python -m shipyard_runtime check --model-dir /model",
    '{"ok": true, "stage": "predict", "prediction": ["setosa"]}',
    "INFO[0057] Pushing image to registry.example.com/shipyard/team-a/iris",
    "INFO[0061] Pushed registry.example.com/shipyard/team-a/iris@" + DIGEST,
]
BROKEN = {
    "serve.py": "def load(model_dir):\n    return None\n\n"
    "def predict(model, payload):\n"
    "    raise ValueError(f'expected 4 features, got {len(payload[0])}')\n",
    "shipyard.yaml": "example_input: [[1, 2, 3]]\n",
}
KANIKO_ERROR = (
    "error building image: error building stage: failed to execute command: waiting for "
    "process to exit: exit status 1"
)


# --------------------------------------------------------------------------- fake cluster


@dataclass
class Outcome:
    """How a build's Job goes: the log its pod writes, and the digest it pushes (None:
    the Kaniko container exits 1 and the Job fails)."""

    log: list[str]
    digest: str | None = DIGEST


@dataclass
class Step:
    status: dict[str, Any]
    phase: str | None  # the pod's phase; None: no pod yet
    lines: int  # log lines written so far
    exit_code: int | None = None


def _steps(outcome: Outcome) -> list[Step]:
    n = len(outcome.log)
    running = {"active": 1, "ready": 1}
    final = (
        Step({"succeeded": 1, "conditions": [_condition("Complete")]}, "Succeeded", n, 0)
        if outcome.digest is not None
        else Step({"failed": 1, "conditions": [_condition("Failed")]}, "Failed", n, 1)
    )
    return [
        Step({}, None, 0),
        Step({"active": 1, "ready": 0}, "Pending", 0),
        Step(running, "Running", n // 3),
        Step(running, "Running", 2 * n // 3),
        Step(running, "Running", n),
        final,
    ]


RUNNING_WITH_TWO_THIRDS = 3
"""The step index a test holds a Job at to keep its build running."""


def _condition(kind: str) -> dict[str, Any]:
    return {"type": kind, "status": "True", "lastTransitionTime": fake_kube.now()}


@dataclass
class ClusterAPI(fake_kube.FakeKubeAPI):
    """The shared fake API serving the build namespace, plus a scripted Job controller and
    kubelet: every read of a build's Job moves it one :class:`Step` on (never past
    ``hold[image name]``) and puts its pod, log and termination message where the runner
    reads them. ``outcomes`` says how the Job of each image name goes."""

    namespace: str = NS
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    hold: dict[str, int] = field(default_factory=dict)
    step: dict[str, int] = field(default_factory=dict)
    created: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)

    def _store(self, resource: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.created[(resource, name)] += 1
        return super()._store(resource, name, obj)

    def on_read(self, resource: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        if resource != "jobs":
            return obj
        labels = obj["metadata"]["labels"]
        image = labels["shipyard.io/image"]
        outcome = self.outcomes[image]
        steps = _steps(outcome)
        index = min(self.step.get(name, -1) + 1, len(steps) - 1, self.hold.get(image, 99))
        self.step[name] = index
        step = steps[index]
        obj["status"] = step.status
        if step.phase is not None:
            self._show_pod(f"{name}-x7k2p", labels["shipyard.io/build-id"], step, outcome)
        return obj

    def _show_pod(self, pod: str, build_id: str, step: Step, outcome: Outcome) -> None:
        text = "".join(f"{line}\n" for line in outcome.log[: step.lines])
        status: dict[str, Any] = {"phase": step.phase}
        if step.exit_code is not None:
            # terminationMessagePolicy FallbackToLogsOnError: on success the message is the
            # file Kaniko's --digest-file wrote, on failure the log's tail.
            message = (outcome.digest or "") if step.exit_code == 0 else text[-2048:]
            terminated = {"exitCode": step.exit_code, "message": message}
            status["containerStatuses"] = [
                {
                    "name": "kaniko",
                    "image": DEFAULT_KANIKO_IMAGE,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ]
        self.pods = [p for p in self.pods if p["metadata"]["name"] != pod]
        self.pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod,
                    "namespace": NS,
                    "creationTimestamp": fake_kube.now(),
                    "labels": {"shipyard.io/build-id": build_id},
                },
                "spec": {"containers": [{"name": "kaniko", "image": DEFAULT_KANIKO_IMAGE}]},
                "status": status,
            }
        )
        if text:
            self.logs[pod] = text

    def job_posts(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if (r.method, r.path) == ("POST", JOBS)]


@pytest.fixture
def cluster() -> Iterator[tuple[ClusterAPI, str]]:
    """The fake API and its URL."""
    api = ClusterAPI()
    with fake_kube.serve(api) as url:
        yield api, url


@pytest.fixture
def kube_client(cluster: tuple[ClusterAPI, str]) -> Iterator[k8s.ApiClient]:
    client = k8s.ApiClient(k8s.Configuration(host=cluster[1]))
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------- S3 (moto)
# moto_endpoint: shipyard_testing's moto server, with SHIPYARD_S3_ENDPOINT and fake
# credentials in the environment (the object store and builder processes read them).


@pytest.fixture
def bucket(moto_endpoint: str) -> str:
    name = f"shipyard-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    return name


def _settings(database_url: str, nats_url: str, tmp_path: Path, bucket: str, **kw: Any) -> Any:
    values: dict[str, Any] = {
        "database_url": database_url,
        "nats_url": nats_url,
        "grpc_port": 0,
        "data_dir": tmp_path,
        "object_store": f"s3://{bucket}/shipyard",
        "build_backend": "kubernetes",
        "k8s_build_registry": REGISTRY,
        "k8s_build_poll_seconds": 0.05,
        "uv_cache_dir": tmp_path / "uv-cache",
    }
    values.update(kw)
    return ImageBuildSettings(**values)


@pytest.fixture
async def host(
    database_url: str,
    nats_url: str,
    tmp_path: Path,
    bucket: str,
    kube_client: k8s.ApiClient,
) -> AsyncIterator[ServiceHost]:
    settings = _settings(database_url, nats_url, tmp_path, bucket)
    h = await build(settings, StaticAuthenticator(TOKENS), ack_wait=3.0, kube_client=kube_client)
    async with h:
        yield h


async def _build_log(stub: imagebuild_pb2_grpc.ImageBuildServiceStub, build_id: str) -> list[str]:
    return [
        line.line
        async for line in stub.StreamBuildLogs(
            pb.StreamBuildLogsRequest(build_id=build_id), metadata=_md("ana")
        )
    ]


def _args(job: dict[str, Any]) -> dict[str, str]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"])


def _in_order(needles: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(line == needle for line in it) for needle in needles)


async def _log_shows(
    stub: imagebuild_pb2_grpc.ImageBuildServiceStub, build_id: str, *needles: str
) -> list[str]:
    """The build log once it holds ``needles`` in that order (lines are flushed every
    0.2 s, so the last ones may land just after the build's end is visible)."""

    async def shown() -> list[str] | None:
        lines = await _build_log(stub, build_id)
        return lines if _in_order(list(needles), lines) else None

    return await wait_for(shown, timeout=20, interval=0.1, message=f"build log shows {needles}")


async def _job_deleted(api: ClusterAPI, job: str) -> None:
    def gone() -> bool:
        with api.lock:
            return ("jobs", job) not in api.objects and ("configmaps", job) not in api.objects

    await wait_for(gone, timeout=20, interval=0.05, message=f"Job {job} deleted")


# --------------------------------------------------------------------------- the builds


async def test_a_cluster_build_pushes_an_image_the_catalog_pins_by_digest(
    host: ServiceHost, cluster: tuple[ClusterAPI, str], bucket: str, moto_endpoint: str
) -> None:
    api, _ = cluster
    api.outcomes["iris"] = Outcome(IRIS_LOG)
    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        started = await _start(stub, "ana", "iris", _tar(EXAMPLES / "iris"))
        done = await _finished(stub, started.build_id, deadline=120)
        assert done.state == pb.BUILD_STATE_SUCCEEDED, done.reason + "\n" + done.log_tail
        assert done.image == "iris:1" and done.attempts == 1

        image = await stub.GetImage(pb.GetImageRequest(image="iris:1"), metadata=_md("ana"))
        hexdigest = DIGEST.removeprefix("sha256:")
        assert image.digest == hexdigest
        # Its own fields: kind and the reference pinned by digest; no pack.
        assert image.kind == "oci" and image.image_ref == f"{REGISTRY}/team-a/iris@{DIGEST}"
        assert image.pack_url == ""
        assert image.script == "serve.py" and image.size_bytes == 0
        listed = await stub.ListImages(pb.ListImagesRequest(name="iris"), metadata=_md("ana"))
        assert [(i.kind, i.image_ref) for i in listed.images] == [("oci", image.image_ref)]
        packages = {(p.name, p.version) for p in image.packages}
        assert ("scikit-learn", "1.5.2") in packages  # from pip's line in the pod log

        # Kaniko's output is in the build log, in order, and so is the cleanup.
        job = kaniko.job_name(started.build_id)
        await _log_shows(stub, started.build_id, *IRIS_LOG, f"deleted Job {NS}/{job}")
        await _job_deleted(api, job)

        # One Job, for this build, reading the uploaded context, pushing under the
        # registry prefix with the build id as tag; deleted with its ConfigMap afterwards.
        (posted,) = api.job_posts()
        assert posted["metadata"]["labels"]["shipyard.io/build-id"] == started.build_id
        args = _args(posted)
        assert args["destination"] == f"{REGISTRY}/team-a/iris:{started.build_id}"
        deletes = [r for r in api.requests if r.method == "DELETE" and r.path == f"{JOBS}/{job}"]
        assert deletes and deletes[0].query["propagationPolicy"] == ["Background"]

        prefix = f"s3://{bucket}/"
        assert args["context"].startswith(prefix + "shipyard/contexts/sha256/")
        s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
        body = s3.get_object(Bucket=bucket, Key=args["context"].removeprefix(prefix))["Body"]
        with tarfile.open(fileobj=io.BytesIO(body.read())) as tar:
            names = set(tar.getnames())
        assert {"model/serve.py", "model/shipyard.json", "requirements.txt"} <= names
        assert any(n.startswith("shipyard_runtime-") and n.endswith(".whl") for n in names)

        # Identical inputs: the cache answers with the same image, no second Job.
        again = await _start(stub, "ana", "iris", _tar(EXAMPLES / "iris"))
        assert again.state == pb.BUILD_STATE_SUCCEEDED and again.cache_hit
        assert again.version == 1
        assert len(api.job_posts()) == 1
        # Under another name it is built again: an image is not shared across registry
        # repositories the way a pack is shared across names.
        api.outcomes["iris-copy"] = Outcome(IRIS_LOG)
        copy = await _start(stub, "ana", "iris-copy", _tar(EXAMPLES / "iris"))
        assert not copy.cache_hit
        copied = await _finished(stub, copy.build_id, deadline=120)
        assert copied.state == pb.BUILD_STATE_SUCCEEDED, copied.reason
        assert len(api.job_posts()) == 2


async def test_a_short_api_outage_at_submit_does_not_fail_the_build(
    host: ServiceHost, cluster: tuple[ClusterAPI, str]
) -> None:
    api, _ = cluster
    api.outcomes["iris"] = Outcome(IRIS_LOG)
    api.fail[("POST", "jobs")] = 503  # the API server overloaded when the Job is created
    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        started = await _start(stub, "ana", "iris", _tar(EXAMPLES / "iris"))
        await wait_for(lambda: api.job_posts(), timeout=60, message="the Job's creation was tried")

        async def said_retrying() -> bool:
            lines = await _build_log(stub, started.build_id)
            return any(line.endswith("; retrying") for line in lines)

        await wait_for(said_retrying, timeout=20, interval=0.1, message="a retry logged")
        del api.fail[("POST", "jobs")]
        done = await _finished(stub, started.build_id, deadline=120)
        # Waited out, in the same attempt: not failed, not resumed by another builder.
        assert done.state == pb.BUILD_STATE_SUCCEEDED, done.reason + "\n" + done.log_tail
        assert done.attempts == 1
        assert len(api.job_posts()) >= 2


@pytest.fixture(scope="module")
def broken_verdict(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The check step's verdict line exactly as the runtime prints it for BROKEN."""
    model = tmp_path_factory.mktemp("broken")
    for name, text in BROKEN.items():
        (model / name).write_text(text)
    (model / "shipyard.json").write_text(json.dumps({"example_input": [[1, 2, 3]]}))
    check = subprocess.run(
        [sys.executable, "-m", "shipyard_runtime", "check", "--model-dir", str(model)],
        capture_output=True,
        text=True,
    )
    verdict = check.stdout.strip().splitlines()[-1]
    assert json.loads(verdict)["ok"] is False
    return verdict


async def test_a_failed_job_fails_the_build_with_the_check_reason_and_log_tail(
    host: ServiceHost, cluster: tuple[ClusterAPI, str], broken_verdict: str
) -> None:
    verdict = broken_verdict
    api, _ = cluster
    failing_log = [
        "INFO[0052] RUN python -m shipyard_runtime check --model-dir /model",
        verdict,
        KANIKO_ERROR,
    ]
    api.outcomes["broken"] = Outcome(failing_log, digest=None)
    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        started = await _start(stub, "ana", "broken", _tar(files=BROKEN))
        done = await _finished(stub, started.build_id, deadline=120)
        assert done.state == pb.BUILD_STATE_FAILED
        assert "model check failed at stage predict" in done.reason, done.reason
        assert "expected 4 features, got 3" in done.reason
        assert KANIKO_ERROR in done.log_tail and verdict in done.log_tail
        job = kaniko.job_name(started.build_id)
        await _log_shows(stub, started.build_id, *failing_log, f"deleted Job {NS}/{job}")
        await _job_deleted(api, job)
        images = await stub.ListImages(pb.ListImagesRequest(name="broken"), metadata=_md("ana"))
        assert list(images.images) == []


def _kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": url}}],
                "users": [{"name": "fake", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    return path


def _env(settings: ImageBuildSettings, kubeconfig: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(
        {
            "SHIPYARD_DATABASE_URL": settings.database_url,
            "SHIPYARD_NATS_URL": settings.nats_url,
            "SHIPYARD_DATA_DIR": str(settings.data_dir),
            "SHIPYARD_GRPC_PORT": "0",
            "SHIPYARD_OBJECT_STORE": settings.object_store,
            "SHIPYARD_BUILD_BACKEND": "kubernetes",
            "SHIPYARD_K8S_BUILD_REGISTRY": REGISTRY,
            "SHIPYARD_K8S_BUILD_POLL_SECONDS": "0.05",
            "SHIPYARD_UV_CACHE_DIR": str(settings.uv_cache_path()),
            "SHIPYARD_BUILD_ACK_WAIT_SECONDS": "2",
            "SHIPYARD_LOG_LEVEL": "WARNING",
            "KUBECONFIG": str(kubeconfig),
        }
    )
    return env


async def test_a_killed_builder_is_resumed_by_another_that_follows_the_same_job(
    database_url: str,
    nats_url: str,
    tmp_path: Path,
    bucket: str,
    cluster: tuple[ClusterAPI, str],
    kube_client: k8s.ApiClient,
) -> None:
    """Builders are separate processes reaching the fake cluster through a kubeconfig (as
    they would outside a cluster); the first is killed with SIGKILL mid-build."""
    api, url = cluster
    api.outcomes["iris"] = Outcome(IRIS_LOG)
    settings = _settings(database_url, nats_url, tmp_path, bucket, build_concurrency=0)
    env = _env(settings, _kubeconfig(tmp_path / "kubeconfig", url))
    api_only = await build(settings, StaticAuthenticator(TOKENS), kube_client=kube_client)
    procs: list[subprocess.Popen[bytes]] = []

    def builder() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "shipyard_imagebuild"], env=env)
        procs.append(proc)
        return proc

    try:
        async with api_only, grpc.aio.insecure_channel(api_only.address) as ch:
            stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
            api.hold["iris"] = RUNNING_WITH_TWO_THIRDS
            first = builder()
            started = await _start(stub, "ana", "iris", _tar(EXAMPLES / "iris"))
            job = kaniko.job_name(started.build_id)

            async def copying() -> bool:
                # The first builder submitted the Job and copies its pod's log.
                return IRIS_LOG[1] in await _build_log(stub, started.build_id)

            await wait_for(copying, timeout=90, interval=0.1, message="first builder to copy")
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            builder()
            with api.lock:
                del api.hold["iris"]  # the Job runs to its end, whoever follows it

            final = await _finished(stub, started.build_id, deadline=120)
            assert final.state == pb.BUILD_STATE_SUCCEEDED, final.reason + final.log_tail
            assert final.attempts == 2 and final.image == "iris:1"
            # The second attempt followed the first one's Job and created none.
            assert [k for k, n in api.created.items() for _ in range(n) if k[0] == "jobs"] == [
                ("jobs", job)
            ]
            lines = await _log_shows(stub, started.build_id, IRIS_LOG[-1])
            found = f"found Job {NS}/{job} of an earlier attempt"
            assert any(line.startswith(found) for line in lines), lines
            await _job_deleted(api, job)
            image = await stub.GetImage(pb.GetImageRequest(image="iris:1"), metadata=_md("ana"))
            assert image.kind == "oci" and image.image_ref == f"{REGISTRY}/team-a/iris@{DIGEST}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)


async def test_a_build_longer_than_ack_wait_keeps_its_message_and_attempt(
    host: ServiceHost, cluster: tuple[ClusterAPI, str]
) -> None:
    """The builder heartbeats (in-progress acks) while it polls: a Job running for longer
    than ack_wait (3 s here) is not redelivered and started again."""
    api, _ = cluster
    api.outcomes["iris"] = Outcome(IRIS_LOG)
    api.hold["iris"] = RUNNING_WITH_TWO_THIRDS

    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        started = await _start(stub, "ana", "iris", _tar(EXAMPLES / "iris"))
        await _log_shows(stub, started.build_id, IRIS_LOG[1])  # running, being polled
        running_since = time.monotonic()
        # The point of the test is time passing: the Job runs past two ack_wait periods.
        await wait_for(
            lambda: time.monotonic() - running_since > 7, timeout=30, message="7 s running"
        )
        with api.lock:
            del api.hold["iris"]
        done = await _finished(stub, started.build_id, deadline=60)
        assert done.state == pb.BUILD_STATE_SUCCEEDED, done.reason
        assert done.attempts == 1
        assert len(api.job_posts()) == 1


async def test_a_build_out_of_attempts_is_failed_and_its_job_deleted(
    database_url: str,
    nats_url: str,
    tmp_path: Path,
    bucket: str,
    cluster: tuple[ClusterAPI, str],
    kube_client: k8s.ApiClient,
) -> None:
    """A builder stops mid-build; with max_build_attempts=1 the next one fails the build
    as interrupted instead of following its Job, and deletes that Job."""
    api, _ = cluster
    api.outcomes["iris"] = Outcome(IRIS_LOG)
    api.hold["iris"] = RUNNING_WITH_TWO_THIRDS  # never finishes by itself
    settings = _settings(database_url, nats_url, tmp_path, bucket, max_build_attempts=1)
    auth = StaticAuthenticator(TOKENS)
    first = await build(settings, auth, ack_wait=3.0, kube_client=kube_client)
    async with first, grpc.aio.insecure_channel(first.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        started = await _start(stub, "ana", "iris", _tar(EXAMPLES / "iris"))
        await _log_shows(stub, started.build_id, IRIS_LOG[1])  # the Job is running
    job = kaniko.job_name(started.build_id)
    assert ("jobs", job) in api.objects  # a builder that stops leaves the Job

    second = await build(settings, auth, ack_wait=3.0, kube_client=kube_client)
    async with second, grpc.aio.insecure_channel(second.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        done = await _finished(stub, started.build_id, deadline=60)
        assert done.state == pb.BUILD_STATE_FAILED and "interrupted 1 times" in done.reason
        await _job_deleted(api, job)
        assert len(api.job_posts()) == 1


async def test_version_1_image_events_read_as_packs(host: ServiceHost, database_url: str) -> None:
    """An ImageVersionCreated stored before cluster builds (schema version 1, no kind or
    image_ref) is upcast: the catalog shows a pack at its pack key."""
    payload = {
        "version": 1,
        "build_id": "b-0000000000000001",
        "digest": "ab" * 32,
        "size_bytes": 123,
        "pack_key": "packs/sha256/" + "ab" * 32,
        "python": "3.11.7",
        "packages": [["numpy", "2.1.1"]],
        "script": "serve.py",
        "workers": 1,
        "source_digest": "sha256:" + "cd" * 32,
        "source_name": "legacy",
        "cache_key": "ef" * 32,
        "created_by": "ana",
        "readme": "",
    }
    conn = await db.connect(database_url)
    try:
        await ensure_schema(conn, SCHEMA)
    finally:
        await conn.close()
    pool = await db.create_pool(database_url, max_size=2)
    try:
        store = EventStore(pool, SCHEMA, IMAGEBUILD_UPCASTERS)
        event = NewEvent("image", "team-a/legacy", "ImageVersionCreated", 1, payload)
        await store.append([event], 0)
        (read,) = await store.read_stream("image:team-a/legacy")
        assert read.schema_version == 2 and read.payload["kind"] == "pack"
    finally:
        await pool.close()
    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)

        async def shown() -> pb.Image | None:
            try:
                return await stub.GetImage(
                    pb.GetImageRequest(image="legacy:1"), metadata=_md("ana")
                )
            except grpc.aio.AioRpcError:
                return None

        image = await wait_for(shown, timeout=20, interval=0.1, message="legacy image shown")
        assert image.pack_url == payload["pack_key"] and image.digest == payload["digest"]
        assert image.kind == "pack" and image.image_ref == ""


async def test_catalog_tables_of_older_releases_get_the_new_columns(database_url: str) -> None:
    conn = await db.connect(database_url)
    try:
        await ensure_schema(conn, SCHEMA)
        tables = CatalogProjection.live_tables()
        # The images table as releases before decision 0029 made it.
        old = CatalogProjection.tables["images"].replace(
            "kind text NOT NULL DEFAULT 'pack', image_ref text NOT NULL DEFAULT '', ", ""
        )
        assert "image_ref" not in old
        await conn.execute(f"CREATE TABLE {tables['images']} ({old})")
        await CatalogProjection.create_tables(conn)
        await CatalogProjection.create_tables(conn)  # idempotent
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = 'images' ORDER BY ordinal_position",
            SCHEMA,
        )
        assert [c["column_name"] for c in columns][-2:] == ["kind", "image_ref"]
    finally:
        await conn.close()


# --------------------------------------------------------------------------- settings


def test_settings_defaults_are_the_kaniko_adapters() -> None:
    assert DEFAULT_BUILD_NAMESPACE == kaniko.DEFAULT_NAMESPACE
    assert DEFAULT_KANIKO_IMAGE == kaniko.DEFAULT_KANIKO_IMAGE
    assert ImageBuildSettings().build_backend == "local"  # nothing changes by default


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"k8s_build_registry": ""}, "SHIPYARD_K8S_BUILD_REGISTRY"),
        ({"k8s_build_registry": "https://registry.example.com/x"}, "SHIPYARD_K8S_BUILD_REGISTRY"),
        ({"k8s_build_registry": "registry.example.com"}, "SHIPYARD_K8S_BUILD_REGISTRY"),
        ({"k8s_build_registry": "registry.example.com/x:1"}, "SHIPYARD_K8S_BUILD_REGISTRY"),
        ({"object_store": ""}, "SHIPYARD_OBJECT_STORE"),
        ({"object_store": "file:///srv/objects"}, "SHIPYARD_OBJECT_STORE"),
        ({"k8s_build_cpu": "two"}, "SHIPYARD_K8S_BUILD_CPU"),
        ({"k8s_build_memory": "2 GB"}, "SHIPYARD_K8S_BUILD_MEMORY"),
        ({"k8s_build_namespace": "Builds"}, "SHIPYARD_K8S_BUILD_NAMESPACE"),
        ({"k8s_kaniko_image": "kaniko --insecure"}, "SHIPYARD_K8S_KANIKO_IMAGE"),
        ({"k8s_registry_secret": "Login_Secret"}, "SHIPYARD_K8S_REGISTRY_SECRET"),
        ({"k8s_build_poll_seconds": 0}, "SHIPYARD_K8S_BUILD_POLL_SECONDS"),
        ({"k8s_build_timeout_seconds": 0}, "SHIPYARD_K8S_BUILD_TIMEOUT_SECONDS"),
        ({"build_backend": "kaniko"}, "SHIPYARD_BUILD_BACKEND"),
        (
            {"runtime_wheel": "/nonexistent/shipyard_runtime-0.1.0-py3-none-any.whl"},
            "SHIPYARD_RUNTIME_WHEEL",
        ),
    ],
)
def test_bad_kubernetes_settings_name_the_setting(overrides: dict[str, Any], named: str) -> None:
    values: dict[str, Any] = {
        "build_backend": "kubernetes",
        "object_store": "s3://shipyard",
        "k8s_build_registry": REGISTRY,
    }
    ImageBuildSettings(**values)  # the baseline is valid
    values.update(overrides)
    with pytest.raises(ValidationError) as err:
        ImageBuildSettings(**values)
    message = settings_error(err.value)
    assert named in message and "\n" not in message, message


def test_kubernetes_settings_are_not_checked_for_local_builds() -> None:
    settings = ImageBuildSettings(k8s_build_registry="https://nope", k8s_build_cpu="two")
    assert settings.build_backend == "local"


def _start_process(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shipyard_imagebuild"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_service_refuses_to_start_with_one_line_naming_the_problem(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIPYARD_", "KUBERNETES_"))}
    env.update({"SHIPYARD_DATA_DIR": str(tmp_path), "SHIPYARD_BUILD_BACKEND": "kubernetes"})
    missing = _start_process({**env, "SHIPYARD_OBJECT_STORE": "s3://shipyard"})
    assert missing.returncode == 1
    (line,) = missing.stderr.strip().splitlines()
    assert line.startswith("imagebuild: bad settings: SHIPYARD_K8S_BUILD_REGISTRY is required")

    # Valid settings, but no cluster: neither in one nor a kubeconfig.
    no_cluster = _start_process(
        {
            **env,
            "SHIPYARD_OBJECT_STORE": "s3://shipyard",
            "SHIPYARD_K8S_BUILD_REGISTRY": REGISTRY,
            "KUBECONFIG": str(tmp_path / "missing-kubeconfig"),
            "HOME": str(tmp_path),
        }
    )
    assert no_cluster.returncode == 1
    (line,) = no_cluster.stderr.strip().splitlines()
    assert line.startswith("imagebuild: cannot start: no Kubernetes configuration"), line


# --------------------------------------------------------------------------- pieces


def test_cache_keys_of_the_two_backends_never_meet(tmp_path: Path) -> None:
    settings = ImageBuildSettings(
        data_dir=tmp_path,
        build_backend="kubernetes",
        object_store="s3://shipyard",
        k8s_build_registry=REGISTRY,
    )
    runtime = Path(__file__).resolve().parents[3] / "libs" / "runtime"
    oci = KanikoBackend(settings, None, None, None, runtime_source=runtime)  # type: ignore[arg-type]
    inputs = ("sha256:" + "12" * 32, "3.11", True)
    assert oci.cache_key(*inputs) == oci.cache_key(*inputs)
    assert oci.cache_key(*inputs) != pack_cache_key(*inputs)
    assert oci.cache_key(*inputs) != oci.cache_key(inputs[0], "3.11", False)
    moved = settings.model_copy(update={"k8s_build_registry": "other.example/shipyard"})
    elsewhere = KanikoBackend(moved, None, None, None, runtime_source=runtime)  # type: ignore[arg-type]
    assert elsewhere.cache_key(*inputs) != oci.cache_key(*inputs)


def test_log_lines_are_copied_once_and_whole() -> None:
    assert new_log_lines("", 0, final=False) == ([], 0)
    assert new_log_lines("a\nb\npart", 0, final=False) == (["a", "b"], 2)
    assert new_log_lines("a\nb\npartial line\nc\n", 2, final=False) == (["partial line", "c"], 4)
    assert new_log_lines("a\nb\nlast", 2, final=True) == (["last"], 3)
    assert new_log_lines("a\n", 3, final=True) == ([], 3)


def test_failure_reason_without_a_check_verdict_is_the_last_line() -> None:
    assert failure_reason(f"INFO step\n{KANIKO_ERROR}\n\n", "ns/job") == (
        f"the image build failed: {KANIKO_ERROR} (the build log has Kaniko's output)"
    )
    assert "ns/job failed without a log" in failure_reason("", "ns/job")


def test_packages_come_from_pips_last_install_line() -> None:
    assert pip_installed(IRIS_LOG)[:3] == [
        ("joblib", "1.4.2"),
        ("numpy", "2.1.1"),
        ("scikit-learn", "1.5.2"),
    ]
    assert pip_installed(["nothing installed"]) == []
