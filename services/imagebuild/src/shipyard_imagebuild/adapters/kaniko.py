"""Cluster builds: an OCI image built by a Kaniko Job instead of a local environment pack.

On a cluster the imagebuild service can produce a container image rather than a pack
(DESIGN.md, "Build"). The pieces, all through the official ``kubernetes`` client:

- :func:`write_context` packs the **build context** Kaniko reads (upload it to the object
  store; its ``s3://`` URL, or a presigned ``https://`` URL, is ``KanikoBuild.source_url``)::

      shipyard_runtime-<version>-<tags>.whl   the runtime, installed into the image
      requirements.txt                        every requirement line the local build
                                              would install, in its order (the Dockerfile
                                              also copes with its absence)
      model/                                  the model folder plus shipyard.json

- :func:`dockerfile` is the Dockerfile the build runs; like a local build it installs the
  requirements and the runtime, then runs ``python -m shipyard_runtime check`` so a model
  whose ``load()`` or ``predict()`` fails also fails the image build.
- :func:`config_map_manifest` holds that Dockerfile; :func:`job_manifest` is the Kaniko
  Job that reads the context and pushes ``KanikoBuild.destination``.
- :class:`KubernetesBuildRunner` submits, watches, reads logs of and deletes build Jobs.
  Its calls are synchronous; the service runs them in a thread.

Cluster objects the manifests expect are in ``infra/k8s/imagebuild-rbac.yaml``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubernetes import client as k8s

from shipyard_core import kube, validation
from shipyard_core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ShipyardError,
    Unavailable,
)
from shipyard_imagebuild.adapters.folder import (
    MANIFEST_FILE,
    folder_files,
    inspect_folder,
    source_digest,
    write_tar_gz,
)

BuildStatus = Literal["pending", "running", "succeeded", "failed"]

DEFAULT_NAMESPACE = "shipyard-builds"
DEFAULT_KANIKO_IMAGE = "gcr.io/kaniko-project/executor:v1.23.2"
OBJECT_STORE_SECRET = "shipyard-object-store"  # noqa: S105 - a Secret's name, not a password
"""Secret (in the build namespace) with the object store credentials for ``s3://``
contexts. Its keys are the variable names Kaniko reads: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, and optionally ``AWS_REGION``, ``S3_ENDPOINT`` and
``S3_FORCE_PATH_STYLE`` (``"true"`` for MinIO and most S3-compatible servers)."""

JOB_PREFIX = "shipyard-build-"
CONTAINER = "kaniko"
RUNTIME_UID = kube.MODEL_IMAGE_UID
"""The unprivileged user the image's model server (and the build's check) runs as."""
SERVE_PORT = kube.MODEL_IMAGE_PORT
MODEL_DIR = kube.MODEL_IMAGE_DIR
"""The model folder in the image. These three are the contract with the scheduler's
kubernetes backend, which runs the image (``shipyard_core.kube``)."""

LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_BUILD_ID = "shipyard.io/build-id"
LABEL_GROUP = "shipyard.io/group"
LABEL_IMAGE = "shipyard.io/image"
LABEL_IMAGE_VERSION = "shipyard.io/image-version"

_DOCKERFILE_DIR = "/shipyard"
_DOCKERFILE_KEY = "Dockerfile"
DOCKERFILE_PATH = f"{_DOCKERFILE_DIR}/{_DOCKERFILE_KEY}"
_DOCKER_CONFIG_DIR = "/kaniko/.docker"
# Kaniko writes the pushed image's digest here; the kubelet turns the file into the
# container's termination message, which outlives the pod's logs.
_DIGEST_FILE = "/dev/termination-log"

# Kaniko runs as root and needs these to unpack the base image's files with their owners
# and modes (CHOWN, DAC_OVERRIDE, FOWNER, SETFCAP) and to run RUN steps as the USER of the
# Dockerfile (SETUID, SETGID). All are in the Pod Security "baseline" set.
_KANIKO_CAPABILITIES = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETFCAP", "SETGID", "SETUID"]

# The Job name is JOB_PREFIX + build id and must stay a 63-character DNS label (the Job
# controller copies it into a pod label).
_BUILD_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$")
_PYTHON = re.compile(r"^\d+\.\d+(\.\d+)?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_WHEEL = re.compile(r"^shipyard_runtime-[^-/]+-[^/]+\.whl$")
# Requirement lines that name files of the model folder: the context holds the resolved
# lines in one requirements.txt at its root, where such relative paths would not resolve.
# An option naming a file or folder (a URL is fine), or a bare or ``name @`` local path.
_LOCAL_REQUIREMENT = re.compile(
    r"^(-r|--requirement|-c|--constraint|-e|--editable|-f|--find-links)(\s+|=)?(?![\w+.-]+://)\S"
    r"|^(\.{1,2}/|/|file:)"
    r"|\s@\s*file:"
)


@dataclass(frozen=True)
class KanikoBuild:
    """One cluster image build: what to build, where to push it, and the Job's limits."""

    build_id: str
    """The Build aggregate's id (``b-<hex>``); names the Job and ConfigMap."""
    group: str
    name: str
    """The image name (``name:version`` in the catalog)."""
    version: int
    """The version the build expects to become, for labels and the annotation only: the
    catalog numbers versions when a build succeeds, so a concurrent build of the same name
    can take it first (which is why imagebuild tags images with the build id)."""
    source_url: str
    """``s3://bucket/key.tar.gz`` or ``https://...`` of the context :func:`write_context`
    made. Kaniko downloads it itself; ``s3://`` uses the ``shipyard-object-store`` secret."""
    destination: str
    """``registry/repository:tag`` to push to."""
    namespace: str = DEFAULT_NAMESPACE
    kaniko_image: str = DEFAULT_KANIKO_IMAGE
    python: str = "3.11"
    """Python of the base image ``python:<python>-slim``."""
    pull_secret: str | None = None
    """A ``kubernetes.io/dockerconfigjson`` secret: pulls the Kaniko image, and is
    Kaniko's registry login for the base image, the cache and the push."""
    service_account: str = "shipyard-builder"
    cpu: str = "1"
    memory: str = "2Gi"
    timeout_seconds: int = 1800
    """``activeDeadlineSeconds``: the whole build, from the pod's start, is cut off then."""
    cache_repo: str | None = None
    """Repository for Kaniko's layer cache; None lets Kaniko derive ``<destination>/cache``."""
    install_dependencies: bool = True
    """False (offline sites): no requirements are installed and the check only compiles the
    serving script, as in local builds."""
    ttl_seconds_after_finished: int = 86400
    """How long a finished Job and its pod (with the build log) stay for :meth:`status` and
    :meth:`logs`; Kubernetes deletes them (and the ConfigMap it owns) afterwards."""
    ephemeral_storage: str | None = None
    """Request and limit for the pod's disk (Kaniko unpacks the base image and every layer
    into its container's filesystem); None leaves it to the namespace's defaults."""

    def __post_init__(self) -> None:
        if not _BUILD_ID.match(self.build_id):
            raise InvalidArgument(
                "build_id",
                f"{self.build_id!r} cannot name a Kubernetes Job",
                "use 1-48 lowercase letters, digits and '-', a letter or digit at both ends",
            )
        validation.name("group", self.group)
        validation.name("name", self.name)
        validation.positive_int("version", self.version)
        if not self.source_url.startswith(("s3://", "https://")):
            raise InvalidArgument(
                "source_url",
                f"{self.source_url!r} is not an s3:// or https:// URL",
                "upload the context made by write_context() and pass its URL",
            )
        for field, value in (("destination", self.destination), ("cache_repo", self.cache_repo)):
            if value is not None and (not value or "://" in value or re.search(r"\s", value)):
                raise InvalidArgument(
                    field, f"{value!r} is not an image reference", "e.g. registry.example/iris:1"
                )
        if not _PYTHON.match(self.python):
            raise InvalidArgument(
                "python", f"must be a version like 3.11, got {self.python!r}", 'e.g. "3.11"'
            )
        for field, value in (
            ("cpu", self.cpu),
            ("memory", self.memory),
            ("ephemeral_storage", self.ephemeral_storage),
        ):
            if value is not None and not _QUANTITY.match(value):
                raise InvalidArgument(
                    field, f"{value!r} is not a Kubernetes quantity", "e.g. 500m, 2, 2Gi"
                )
        validation.positive_int("timeout_seconds", self.timeout_seconds)
        if self.ttl_seconds_after_finished < 0:
            raise InvalidArgument("ttl_seconds_after_finished", "must be >= 0")

    @property
    def job_name(self) -> str:
        """The Job's name; the ConfigMap has the same one."""
        return job_name(self.build_id)

    @property
    def labels(self) -> dict[str, str]:
        """Labels of the Job, its pod and the ConfigMap (all valid label values: names are
        DNS labels and the version an integer)."""
        return {
            LABEL_PART_OF: "shipyard",
            LABEL_COMPONENT: "image-build",
            LABEL_BUILD_ID: self.build_id,
            LABEL_GROUP: self.group,
            LABEL_IMAGE: self.name,
            LABEL_IMAGE_VERSION: str(self.version),
        }


def job_name(build_id: str) -> str:
    """The name of the Job (and ConfigMap) of a build."""
    return JOB_PREFIX + build_id


# --------------------------------------------------------------------------- Dockerfile


def dockerfile(python: str, *, check: bool = True) -> str:
    """The Dockerfile of a cluster build, for the context :func:`write_context` makes.

    ``check`` runs ``python -m shipyard_runtime check`` as a build step (import, ``load()``,
    ``predict()`` on the example input), so a broken model fails the build as it does
    locally; without it (``install_dependencies: false``) the serving script is only
    compiled. The requirements' installation, the check and the server run as an
    unprivileged user, in a virtual environment it owns; the model files are root's and
    read-only to it.
    """
    if not _PYTHON.match(python):
        raise InvalidArgument("python", f"must be a version like 3.11, got {python!r}")
    if check:
        verify = f"RUN python -m shipyard_runtime check --model-dir {MODEL_DIR}"
    else:
        # The same syntax-only check a local build does when dependencies are skipped.
        code = (
            "import pathlib; "
            f"p = next(f for f in map(pathlib.Path, ('{MODEL_DIR}/serve.py', "
            f"'{MODEL_DIR}/score.py')) "
            "if f.is_file()); "
            "compile(p.read_bytes(), str(p), 'exec')"
        )
        verify = "RUN " + json.dumps(["python", "-c", code])
    cmd = json.dumps(
        [
            kube.MODEL_IMAGE_PYTHON,
            "-m",
            "shipyard_runtime",
            "serve",
            "--model-dir",
            MODEL_DIR,
            "--port",
            str(SERVE_PORT),
            "--host",
            "0.0.0.0",  # noqa: S104 - a container's server must listen beyond loopback
        ]
    )
    return f"""\
# Built by Kaniko from a Shipyard build context (shipyard_imagebuild.adapters.kaniko).
FROM python:{python}-slim
ENV PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1 \\
    PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid {RUNTIME_UID} shipyard \\
 && useradd --system --uid {RUNTIME_UID} --gid shipyard --create-home \\
    --home-dir /home/shipyard --shell /usr/sbin/nologin shipyard \\
 && python -m venv {kube.MODEL_IMAGE_ENV} \\
 && chown -R {RUNTIME_UID}:{RUNTIME_UID} {kube.MODEL_IMAGE_ENV}
ENV PATH={kube.MODEL_IMAGE_ENV}/bin:$PATH
# Everything that runs code of the model's (its requirements' build scripts, then the
# check that imports it) runs as the unprivileged user: never as root next to the build's
# registry and object store credentials.
USER {RUNTIME_UID}:{RUNTIME_UID}
# Dependencies before the model files: the layer cache keeps this (slow) layer while only
# the model changes. requirements.tx[t] matches nothing when the context has no
# requirements, which COPY accepts because the wheel always matches; touch then makes the
# file, so one pip call resolves the requirements and the runtime together.
COPY --chown={RUNTIME_UID}:{RUNTIME_UID} shipyard_runtime-*.whl requirements.tx[t] /home/shipyard/
RUN touch /home/shipyard/requirements.txt \\
 && pip install -r /home/shipyard/requirements.txt /home/shipyard/shipyard_runtime-*.whl \\
 && rm -f /home/shipyard/requirements.txt /home/shipyard/shipyard_runtime-*.whl
# The model files are root's: read-only to the user that serves them.
COPY model/ {MODEL_DIR}/
WORKDIR {MODEL_DIR}
{verify}
EXPOSE {SERVE_PORT}
CMD {cmd}
"""


def write_context(
    folder: Path,
    runtime_wheel: Path,
    dest: Path,
    *,
    python: str,
    install_dependencies: bool | None = None,
) -> tuple[str, int]:
    """Packs the build context of ``folder`` into a deterministic tar.gz at ``dest``;
    returns its sha256 (hex) and size. ``install_dependencies`` overrides the folder's
    (``--skip-dependency-install``), as it does for local builds.

    The layout is the module docstring's: the runtime wheel and ``requirements.txt`` (the
    resolved requirement lines; only a comment when there are none or
    ``install_dependencies`` is false) at the root, the model folder under ``model/`` with
    the ``shipyard.json`` a local build writes (``python`` is recorded in it).

    ``InvalidArgument`` when the folder breaks the contract, the wheel is not a
    shipyard-runtime wheel, or a requirement line refers to a file of the folder
    (``-r other.txt``, ``./pkg``), which only local builds resolve so far.
    """
    if not _WHEEL.match(runtime_wheel.name) or not runtime_wheel.is_file():
        raise InvalidArgument(
            "runtime_wheel",
            f"{runtime_wheel} is not a shipyard_runtime-*.whl file",
            "build it with `uv build --wheel libs/runtime`",
        )
    model = inspect_folder(folder)
    install = model.install_dependencies if install_dependencies is None else install_dependencies
    requirements: list[str] = []
    if install:
        for line in model.requirements:
            if _LOCAL_REQUIREMENT.search(line):
                raise InvalidArgument(
                    "requirements",
                    f"{line!r} refers to a file of the model folder, which cluster builds "
                    "do not resolve",
                    "list the requirements themselves in requirements.txt or shipyard.yaml",
                )
            requirements.append(line)
    why_none = "install_dependencies is false" if not install else "none given"
    manifest = model.manifest(source_digest=source_digest(model.path), python_version=python)

    with tempfile.TemporaryDirectory(prefix="shipyard-context-") as tmp:
        generated = Path(tmp)
        (generated / MANIFEST_FILE).write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        files: list[tuple[str, Path, int]] = [
            (f"model/{rel}", path, mode) for rel, path, mode in folder_files(model.path)
        ]
        files.append((f"model/{MANIFEST_FILE}", generated / MANIFEST_FILE, 0o644))
        files.append((runtime_wheel.name, runtime_wheel, 0o644))
        # Always written, empty but for a comment when there is nothing to install: the
        # Dockerfile copes without it, but need not lean on that here.
        header = "" if requirements else f"# no requirements to install ({why_none})\n"
        (generated / "requirements.txt").write_text(
            header + "".join(f"{line}\n" for line in requirements), encoding="utf-8"
        )
        files.append(("requirements.txt", generated / "requirements.txt", 0o644))
        return write_tar_gz(_with_directories(files), dest)


def _with_directories(
    files: list[tuple[str, Path, int]],
) -> Iterator[tuple[str, Path | None, bytes, int, str]]:
    """Tar entries for ``files`` and every folder above them, sorted by name, so the
    archive unpacks the same with any extractor (some need the folder entries)."""
    entries: dict[str, tuple[str, Path | None, bytes, int, str]] = {}
    for name, path, mode in files:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            entries.setdefault(folder, (folder, None, tarfile.DIRTYPE, 0o755, ""))
        entries[name] = (name, path, tarfile.REGTYPE, mode, "")
    for name in sorted(entries):
        yield entries[name]


# --------------------------------------------------------------------------- manifests


def config_map_manifest(build: KanikoBuild, *, owner_uid: str | None = None) -> k8s.V1ConfigMap:
    """The ConfigMap holding the build's Dockerfile (mounted at ``/shipyard``).

    With ``owner_uid`` (the Job's uid) the Job owns it, so Kubernetes deletes it together
    with the Job when ``ttlSecondsAfterFinished`` runs out.
    """
    owners = None
    if owner_uid is not None:
        owners = [
            k8s.V1OwnerReference(
                api_version="batch/v1", kind="Job", name=build.job_name, uid=owner_uid
            )
        ]
    return k8s.V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=k8s.V1ObjectMeta(
            name=build.job_name,
            namespace=build.namespace,
            labels=build.labels,
            owner_references=owners,
        ),
        data={_DOCKERFILE_KEY: dockerfile(build.python, check=build.install_dependencies)},
        # A build's Dockerfile never changes; immutable ConfigMaps also spare the kubelet
        # from watching them.
        immutable=True,
    )


def kaniko_args(build: KanikoBuild) -> list[str]:
    """The Kaniko executor's arguments for ``build``."""
    args = [
        # Kaniko downloads and unpacks a tar.gz context itself from s3:// or https://.
        f"--context={build.source_url}",
        f"--dockerfile={DOCKERFILE_PATH}",
        f"--destination={build.destination}",
        "--cache=true",
    ]
    if build.cache_repo:
        args.append(f"--cache-repo={build.cache_repo}")
    args.append(f"--digest-file={_DIGEST_FILE}")
    return args


def _object_store_env() -> list[Any]:
    """Kaniko's S3 settings from the ``shipyard-object-store`` secret.

    Every key is optional on purpose: a missing secret or key then makes Kaniko fail at
    once with the AWS SDK's error in the build log, where a required key would leave the
    pod in CreateContainerConfigError, "pending" until the deadline, with no log at all.
    It also lets clusters with workload identity (IRSA) leave the credentials out.
    """
    names = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "S3_ENDPOINT",
        "S3_FORCE_PATH_STYLE",
    ]
    return [
        k8s.V1EnvVar(
            name=name,
            value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(
                    name=OBJECT_STORE_SECRET, key=name, optional=True
                )
            ),
        )
        for name in names
    ]


def job_manifest(build: KanikoBuild) -> k8s.V1Job:
    """The Kaniko Job of ``build``.

    One attempt only (``backoffLimit: 0``): the service decides whether a failed build is
    retried, as a new build, and a rerun would only repeat a deterministic failure.
    """
    labels = build.labels
    resources: dict[str, str] = {"cpu": build.cpu, "memory": build.memory}
    if build.ephemeral_storage is not None:
        resources["ephemeral-storage"] = build.ephemeral_storage

    volumes = [
        k8s.V1Volume(
            name="dockerfile",
            config_map=k8s.V1ConfigMapVolumeSource(name=build.job_name),
        )
    ]
    mounts = [k8s.V1VolumeMount(name="dockerfile", mount_path=_DOCKERFILE_DIR, read_only=True)]
    if build.pull_secret:
        volumes.append(
            k8s.V1Volume(
                name="docker-config",
                secret=k8s.V1SecretVolumeSource(
                    secret_name=build.pull_secret,
                    items=[k8s.V1KeyToPath(key=".dockerconfigjson", path="config.json")],
                    # Root only: the check step runs the model's code as the unprivileged
                    # user, which must not be able to read the registry login. Optional:
                    # a missing secret fails the push with a clear log instead of a pod
                    # stuck in ContainerCreating.
                    default_mode=0o400,
                    optional=True,
                ),
            )
        )
        mounts.append(
            k8s.V1VolumeMount(name="docker-config", mount_path=_DOCKER_CONFIG_DIR, read_only=True)
        )

    container = k8s.V1Container(
        name=CONTAINER,
        image=build.kaniko_image,
        args=kaniko_args(build),
        env=_object_store_env() if build.source_url.startswith("s3://") else None,
        # Requests equal to limits: the pod is "Guaranteed", the last to be evicted when a
        # node runs short, and a long build is expensive to lose.
        resources=k8s.V1ResourceRequirements(requests=resources, limits=dict(resources)),
        volume_mounts=mounts,
        # On failure the kubelet keeps the log's tail as the termination message; on
        # success Kaniko has written the image digest there (--digest-file).
        termination_message_policy="FallbackToLogsOnError",
        # As tight as Kaniko allows. Kaniko must run as root in its container: it unpacks
        # the base image over its own filesystem (so no read-only root filesystem either)
        # and sets the files' owners. Everything else is off: not privileged, no privilege
        # escalation (no setuid binaries run during our builds), only the capabilities it
        # needs, and the runtime's default seccomp profile (set on the pod).
        security_context=k8s.V1SecurityContext(
            run_as_user=0,
            run_as_non_root=False,
            privileged=False,
            allow_privilege_escalation=False,
            read_only_root_filesystem=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"], add=list(_KANIKO_CAPABILITIES)),
        ),
    )
    pod = k8s.V1PodSpec(
        restart_policy="Never",
        service_account_name=build.service_account,
        # The build never talks to the Kubernetes API, and the model's code runs in it.
        automount_service_account_token=False,
        enable_service_links=False,
        containers=[container],
        volumes=volumes,
        image_pull_secrets=(
            [k8s.V1LocalObjectReference(name=build.pull_secret)] if build.pull_secret else None
        ),
        security_context=k8s.V1PodSecurityContext(
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")
        ),
    )
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(
            name=build.job_name,
            namespace=build.namespace,
            labels=labels,
            annotations={
                "shipyard.io/image-ref": f"{build.group}/{build.name}:{build.version}",
                "shipyard.io/destination": build.destination,
            },
        ),
        spec=k8s.V1JobSpec(
            backoff_limit=0,
            active_deadline_seconds=build.timeout_seconds,
            ttl_seconds_after_finished=build.ttl_seconds_after_finished,
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=dict(labels)),
                spec=pod,
            ),
        ),
    )


@functools.cache
def _serializer() -> Any:
    # sanitize_for_serialization uses no connection state; one client serves every call.
    return k8s.ApiClient()


def to_dict(obj: Any) -> dict[str, Any]:
    """A client model as the JSON object the client sends (camelCase keys, no nulls)."""
    data = _serializer().sanitize_for_serialization(obj)
    if not isinstance(data, dict):
        raise TypeError(f"{type(obj).__name__} does not serialize to a JSON object")
    return data


def job_status(status: Any) -> BuildStatus:
    """Maps a ``V1JobStatus`` (or None, before the controller reports) to a build state.

    The final conditions win (``FailureTarget`` and ``SuccessCriteriaMet`` are set before
    ``Failed`` and ``Complete`` by recent clusters). Without them the counters decide:
    with ``backoffLimit: 0`` one failed pod is the build's failure. An active pod is
    "running" once it is ready (Kaniko has no probe, so ready means started); clusters too
    old to report ``ready`` count any active pod as running.
    """
    if status is None:
        return "pending"
    conditions = {c.type: c.status for c in status.conditions or []}
    if "True" in (conditions.get("Failed"), conditions.get("FailureTarget")):
        return "failed"
    if "True" in (conditions.get("Complete"), conditions.get("SuccessCriteriaMet")):
        return "succeeded"
    if (status.failed or 0) > 0:
        return "failed"
    if (status.succeeded or 0) > 0:
        return "succeeded"
    if (status.active or 0) > 0 and (status.ready is None or status.ready > 0):
        return "running"
    return "pending"


# --------------------------------------------------------------------------- runner


def _call(doing: str, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """:func:`shipyard_core.kube.call` with this adapter's RBAC hint."""
    return kube.call(
        doing,
        fn,
        rbac_hint="the imagebuild service account needs the Role in infra/k8s/imagebuild-rbac.yaml",
        **kwargs,
    )


class KubernetesBuildRunner:
    """Runs :class:`KanikoBuild` s as Jobs in one namespace, through ``api_client``.

    Every method is synchronous and safe to call again: :meth:`submit` of a build already
    submitted answers as the first call did, :meth:`delete` of a deleted build does nothing.
    """

    def __init__(self, api_client: k8s.ApiClient, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = namespace
        self._core = k8s.CoreV1Api(api_client)
        self._batch = k8s.BatchV1Api(api_client)

    def submit(self, build: KanikoBuild) -> str:
        """Creates the build's Job, then its ConfigMap owned by the Job; returns the Job's
        name. A Job of the same build that exists already counts as submitted (the name is
        the build id's), so a retried or resumed submit is harmless.

        The Job goes first because the ConfigMap needs its uid to be owned by it; its pod
        cannot start before the ConfigMap exists, which is milliseconds later.
        """
        if build.namespace != self.namespace:
            raise InvalidArgument(
                "namespace",
                f"the build is for {build.namespace!r} but this runner uses {self.namespace!r}",
            )
        name = build.job_name
        try:
            job = _call(
                f"creating Job {name}",
                self._batch.create_namespaced_job,
                namespace=self.namespace,
                body=job_manifest(build),
            )
        except AlreadyExists:
            job = self._existing_job(build)
        try:
            _call(
                f"creating ConfigMap {name}",
                self._core.create_namespaced_config_map,
                namespace=self.namespace,
                body=config_map_manifest(build, owner_uid=job.metadata.uid),
            )
        except AlreadyExists:
            pass
        except ShipyardError:
            # Without its Dockerfile the pod would wait in ContainerCreating until the
            # deadline; remove the Job so the failure is the caller's to retry now.
            with contextlib.suppress(ShipyardError):
                self._delete_job(build.build_id)
            raise
        return name

    def _existing_job(self, build: KanikoBuild) -> Any:
        """The Job a create collided with, if it is this build's and not being deleted."""
        name = build.job_name
        job = _call(
            f"reading Job {name}",
            self._batch.read_namespaced_job,
            name=name,
            namespace=self.namespace,
        )
        owner = (job.metadata.labels or {}).get(LABEL_BUILD_ID)
        if owner != build.build_id:
            raise AlreadyExists(
                f"Job {name} exists in {self.namespace} but is not build {build.build_id}'s "
                f"({LABEL_BUILD_ID}={owner!r}); delete it or use another build id"
            )
        if job.metadata.deletion_timestamp is not None:
            raise Unavailable(f"Job {name} is being deleted; submit again once it is gone")
        return job

    def status(self, build_id: str) -> BuildStatus:
        """The build's state from its Job; ``NotFound`` when there is no Job (never
        submitted, deleted, or removed after ``ttl_seconds_after_finished``)."""
        name = job_name(build_id)
        job = _call(
            f"reading Job {name}",
            self._batch.read_namespaced_job,
            name=name,
            namespace=self.namespace,
        )
        return job_status(job.status)

    def _pod(self, build_id: str) -> Any | None:
        """The build's newest pod (with ``backoffLimit: 0`` normally its only one)."""
        pods = _call(
            f"listing the pods of build {build_id}",
            self._core.list_namespaced_pod,
            namespace=self.namespace,
            label_selector=f"{LABEL_BUILD_ID}={build_id}",
        )
        items = list(pods.items or [])
        if not items:
            return None

        def created(pod: Any) -> float:
            stamp = pod.metadata.creation_timestamp
            return stamp.timestamp() if stamp is not None else 0.0

        return max(items, key=created)

    def logs(self, build_id: str, *, tail_lines: int | None = None) -> str:
        """Kaniko's output for the build (the last ``tail_lines`` lines when given);
        ``""`` while there is no pod or it has not started."""
        pod = self._pod(build_id)
        if pod is None or pod.status is None or pod.status.phase in (None, "Pending"):
            return ""
        name = pod.metadata.name
        # Raw bytes: older clients try to parse a log as JSON before returning it as text,
        # which mangles a log that happens to be one JSON document.
        response = _call(
            f"reading the log of pod {name}",
            self._core.read_namespaced_pod_log,
            name=name,
            namespace=self.namespace,
            container=CONTAINER,
            tail_lines=tail_lines,
            _preload_content=False,
        )
        try:
            data: bytes = response.data
        finally:
            response.release_conn()
        return data.decode("utf-8", errors="replace")

    def image_digest(self, build_id: str) -> str | None:
        """The digest (``sha256:<hex>``) Kaniko pushed, from the finished pod's termination
        message; None until the build has succeeded, or once its pod is gone."""
        pod = self._pod(build_id)
        if pod is None or pod.status is None:
            return None
        for container in pod.status.container_statuses or []:
            terminated = container.state.terminated if container.state else None
            if container.name != CONTAINER or terminated is None or terminated.exit_code != 0:
                continue
            message = (terminated.message or "").strip()
            if _DIGEST.match(message):
                return message
        return None

    def _delete_job(self, build_id: str) -> None:
        name = job_name(build_id)
        # Jobs deleted through the API orphan their pods unless told otherwise.
        with contextlib.suppress(NotFound):
            _call(
                f"deleting Job {name}",
                self._batch.delete_namespaced_job,
                name=name,
                namespace=self.namespace,
                propagation_policy="Background",
            )

    def delete(self, build_id: str) -> None:
        """Deletes the build's Job (with its pod, stopping a running build) and ConfigMap;
        a build that is gone already is fine."""
        self._delete_job(build_id)
        name = job_name(build_id)
        with contextlib.suppress(NotFound):
            _call(
                f"deleting ConfigMap {name}",
                self._core.delete_namespaced_config_map,
                name=name,
                namespace=self.namespace,
            )


__all__ = [
    "DEFAULT_KANIKO_IMAGE",
    "DEFAULT_NAMESPACE",
    "DOCKERFILE_PATH",
    "OBJECT_STORE_SECRET",
    "BuildStatus",
    "KanikoBuild",
    "KubernetesBuildRunner",
    "config_map_manifest",
    "dockerfile",
    "job_manifest",
    "job_name",
    "job_status",
    "kaniko_args",
    "to_dict",
    "write_context",
]
