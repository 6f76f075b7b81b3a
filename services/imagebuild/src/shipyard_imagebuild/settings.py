"""Imagebuild's settings (env prefix ``SHIPYARD_``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, ValidationError, model_validator

from shipyard_core.errors import InvalidArgument
from shipyard_core.settings import CommonSettings

# Defaults of the kubernetes build backend. They are the constants of
# shipyard_imagebuild.adapters.kaniko (a test checks it), written out here so that reading
# the settings does not import the kubernetes client.
DEFAULT_BUILD_NAMESPACE = "shipyard-builds"
DEFAULT_KANIKO_IMAGE = "gcr.io/kaniko-project/executor:v1.23.2"

# ``host[:port]/path``: a registry host (lowercase DNS name or IP, optional port) and at
# least one repository path component, lowercase as OCI repositories must be. No scheme,
# tag or digest: imagebuild appends ``/<group>/<name>:<build id>``.
_REGISTRY = re.compile(
    r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?"
    r"(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)+$"
)
_SECRET = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class ImageBuildSettings(CommonSettings):
    """Settings of the imagebuild service."""

    service_name: str = "imagebuild"
    """The name in logs, traces and the NATS connection."""

    grpc_port: int = 50053
    """Port of the ImageBuildService gRPC API."""

    object_store: str = ""
    """Where sources and packs are stored: ``file:///path`` or ``s3://bucket/prefix``.
    Empty: ``file://<data_dir>/objects``."""

    build_dir: Path | None = None
    """Scratch space for builds. Empty: ``<data_dir>/builds``."""

    uv_cache_dir: Path | None = None
    """uv's wheel cache, shared by all builds (what makes the second build fast).
    Empty: ``<data_dir>/uv-cache``."""

    build_concurrency: int = 2
    """How many builds run at once in this process (0: this replica serves the API only)."""

    build_ack_wait_seconds: float = 60.0
    """How long a build may go without a heartbeat before another builder resumes it
    (heartbeats are sent every third of it while the build runs)."""

    max_build_attempts: int = 3
    """A build interrupted this many times (builder crashed) is failed, not retried."""

    image_size_limit_bytes: int = 1 << 30
    """Largest environment pack accepted (default 1 GiB)."""

    max_upload_bytes: int = 1 << 30
    """Largest model folder upload accepted (gzipped tar)."""

    runtime_source: Path | None = None
    """The shipyard-runtime source installed into every image. Empty: this checkout's."""

    projection_wait_seconds: float = 5.0
    """How long a command waits for its effect to show in queries before answering."""

    build_backend: Literal["local", "kubernetes"] = "local"
    """Where images are built. ``local``: environment packs made on this machine (decision
    0015). ``kubernetes``: OCI images built by a Kaniko Job per build in
    ``k8s_build_namespace`` and pushed under ``k8s_build_registry`` (decision 0029); the
    object store must then be ``s3://`` (the Jobs download the build context from it). The
    cluster is reached as the scheduler's kubernetes backend reaches it: the pod's service
    account inside a cluster, else the kubeconfig (``$KUBECONFIG``, else
    ``~/.kube/config``, its current context)."""

    k8s_build_namespace: str = DEFAULT_BUILD_NAMESPACE
    """Kubernetes builds: the namespace of the build Jobs (objects and RBAC in
    ``infra/k8s/imagebuild-rbac.yaml``)."""

    k8s_build_registry: str = ""
    """Kubernetes builds: the repository prefix images are pushed under, as
    ``<prefix>/<group>/<name>:<build id>`` (e.g. ``registry.example.com/shipyard``; no
    scheme, no tag). Required with the kubernetes backend."""

    k8s_registry_secret: str = ""
    """Kubernetes builds: a ``kubernetes.io/dockerconfigjson`` Secret in the build
    namespace, used to pull the Kaniko image and as Kaniko's login to the registry (base
    image, layer cache, push). Empty: none (a registry that needs no login)."""

    k8s_kaniko_image: str = DEFAULT_KANIKO_IMAGE
    """Kubernetes builds: the Kaniko executor image the Jobs run."""

    k8s_build_cpu: str = "1"
    """Kubernetes builds: CPU request and limit of a build pod (a Kubernetes quantity)."""

    k8s_build_memory: str = "2Gi"
    """Kubernetes builds: memory request and limit of a build pod (a Kubernetes quantity)."""

    k8s_build_timeout_seconds: int = Field(default=1800, ge=1)
    """Kubernetes builds: the Job's ``activeDeadlineSeconds``; a build still running then
    is stopped by Kubernetes and fails."""

    k8s_build_poll_seconds: float = Field(default=2.0, gt=0)
    """Kubernetes builds: how often the builder reads the Job's state and its pod's log
    (the log reaches the build log this often)."""

    runtime_wheel: Path | None = None
    """Kubernetes builds: the ``shipyard_runtime-*.whl`` put into every build context.
    Empty: built once per runtime version from ``runtime_source`` with ``uv build`` (which
    needs the runtime's build backend, hatchling, from the package index or uv's cache)."""

    @model_validator(mode="after")
    def _check_build_backend(self) -> Self:
        """The kubernetes backend's settings, checked at start (each message names its
        setting); nothing is checked for the local backend."""
        if self.build_backend != "kubernetes":
            return self
        with_backend = "with SHIPYARD_BUILD_BACKEND=kubernetes"
        if not self.k8s_build_registry:
            raise ValueError(
                f"SHIPYARD_K8S_BUILD_REGISTRY is required {with_backend}: the repository "
                "prefix images are pushed under, e.g. registry.example.com/shipyard"
            )
        if not _REGISTRY.match(self.k8s_build_registry):
            raise ValueError(
                f"SHIPYARD_K8S_BUILD_REGISTRY={self.k8s_build_registry!r} is not a repository "
                "prefix: give host[:port]/path in lowercase, without scheme, tag or trailing "
                "'/', e.g. registry.example.com/shipyard"
            )
        if not self.store_url().startswith("s3://"):
            raise ValueError(
                f"SHIPYARD_OBJECT_STORE must be an s3:// URL {with_backend} (the build Jobs "
                f"download their context from it), not {self.store_url()!r}"
            )
        if not self.k8s_kaniko_image or re.search(r"\s", self.k8s_kaniko_image):
            raise ValueError(
                f"SHIPYARD_K8S_KANIKO_IMAGE={self.k8s_kaniko_image!r} is not an image reference"
            )
        if self.k8s_registry_secret and not _SECRET.match(self.k8s_registry_secret):
            raise ValueError(
                f"SHIPYARD_K8S_REGISTRY_SECRET={self.k8s_registry_secret!r} is not a Secret name "
                "(lowercase letters, digits, '-' and '.')"
            )
        if self.runtime_wheel is not None and not self.runtime_wheel.is_file():
            raise ValueError(f"SHIPYARD_RUNTIME_WHEEL={str(self.runtime_wheel)!r} is not a file")
        self._check_build_values()
        return self

    def _check_build_values(self) -> None:
        """Namespace, quantities and timeout, by the rules the Job manifests use."""
        # Imported here: the kaniko adapter imports the kubernetes client, which only the
        # kubernetes backend needs.
        from shipyard_core import validation
        from shipyard_imagebuild.adapters.kaniko import KanikoBuild

        setting = {
            "cpu": "SHIPYARD_K8S_BUILD_CPU",
            "memory": "SHIPYARD_K8S_BUILD_MEMORY",
            "timeout_seconds": "SHIPYARD_K8S_BUILD_TIMEOUT_SECONDS",
            "destination": "SHIPYARD_K8S_BUILD_REGISTRY",
            "namespace": "SHIPYARD_K8S_BUILD_NAMESPACE",
        }
        try:
            validation.name("namespace", self.k8s_build_namespace)
            KanikoBuild(
                build_id="b-0000000000000000",
                group="group",
                name="name",
                version=1,
                source_url="s3://bucket/context",
                destination=f"{self.k8s_build_registry}/group/name:b-0000000000000000",
                namespace=self.k8s_build_namespace,
                kaniko_image=self.k8s_kaniko_image,
                cpu=self.k8s_build_cpu,
                memory=self.k8s_build_memory,
                timeout_seconds=self.k8s_build_timeout_seconds,
            )
        except InvalidArgument as exc:
            name = setting.get(exc.field, exc.field)
            problem = exc.message.removeprefix(f"{exc.field}: ")
            raise ValueError(f"{name}: {problem}") from None

    def store_url(self) -> str:
        """The object store URL with its default applied."""
        return self.object_store or f"file://{self.data_dir / 'objects'}"

    def builds_path(self) -> Path:
        """The scratch directory with its default applied."""
        return self.build_dir or self.data_dir / "builds"

    def uv_cache_path(self) -> Path:
        """The uv cache directory with its default applied."""
        return self.uv_cache_dir or self.data_dir / "uv-cache"


def settings_error(exc: ValidationError) -> str:
    """A one-line message for settings that do not validate, naming the setting (the first
    problem; fix it and start again to see the next)."""
    error = exc.errors(include_url=False)[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["loc"]:
        field = str(error["loc"][0])
        value = error.get("input")
        shown = f"={value!r}" if isinstance(value, str | int | float) else ""
        return f"SHIPYARD_{field.upper()}{shown}: {message}"
    return message


def load_settings() -> ImageBuildSettings:
    """The settings from the environment; bad ones end the process with one line naming
    the setting (``SystemExit``, exit code 1)."""
    try:
        return ImageBuildSettings()
    except ValidationError as exc:
        raise SystemExit(f"imagebuild: bad settings: {settings_error(exc)}") from None
