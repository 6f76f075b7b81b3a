"""The Kubernetes objects of one revision: a ``Deployment`` (apps/v1) and a ``Service`` (v1).

Pure functions from a :class:`RevisionSpec` and the cluster-wide :class:`PodSettings` to
plain JSON-ready dicts (what the API server receives; also valid as YAML for
``kubectl apply``). :class:`~shipyard_scheduler.adapters.kubernetes.KubernetesBackend`
applies them; tests validate them against the Kubernetes OpenAPI schemas.

A revision runs one of two kinds of image (``RevisionSpec.image_kind``):

- ``pack``, an environment pack in the object store (built locally, decision 0015). Each
  pod has an init container ``fetch-pack`` (the Shipyard service image, which holds
  ``shipyard_scheduler``) running ``python -m shipyard_scheduler.fetchpack`` to download
  the pack and unpack it into the ``env`` emptyDir volume at ``/env``, and the ``model``
  container (a plain Python base image, the same Python the packs were built with: a
  pack's ``bin/python`` links to its base interpreter by absolute path) running
  ``/env/bin/python -m shipyard_runtime serve`` on port 8080.
- ``oci``, an OCI image built on a cluster by imagebuild's Kaniko Job (decision 0029). The
  ``model`` container runs that image itself (``RevisionSpec.image_ref``, pinned by
  digest): no init container, no pack, no object store access. It runs the image's
  model server as the image's Dockerfile sets it up (``shipyard_core.kube``'s
  ``MODEL_IMAGE_*``: ``python -m shipyard_runtime serve --model-dir /model`` as uid
  10001), with the same flags, port, probes, resources and drain as a pack's.

Every container runs as an unprivileged user with a read-only root filesystem (``/tmp``
is an emptyDir), which the Pod Security "restricted" profile admits.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from shipyard_core import kube, validation
from shipyard_core.errors import InvalidArgument
from shipyard_core.objectstore import validate_key
from shipyard_scheduler.adapters.backend import RevisionSpec
from shipyard_scheduler.domain.events import IMAGE_KINDS

DEFAULT_NAMESPACE = "shipyard-models"
DEFAULT_SERVICE_IMAGE = "ghcr.io/shipyard/shipyard:latest"
DEFAULT_RUNTIME_IMAGE = "python:3.11-slim"
DEFAULT_STORE_SECRET = "shipyard-object-store"  # noqa: S105 - a Secret's name, not a password
"""Secret (in the models' namespace) whose keys become the init container's environment:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, and optionally ``AWS_REGION`` and
``AWS_ENDPOINT_URL`` (or ``SHIPYARD_S3_ENDPOINT``). Only the init container sees it."""

SERVE_PORT = 8080
SERVICE_PORT = 80
CONTAINER = "model"
INIT_CONTAINER = "fetch-pack"
ENV_DIR = "/env"
RUN_AS = 65532
"""The unprivileged uid and gid of a pack's containers (the Shipyard image's user)."""
OCI_RUN_AS = kube.MODEL_IMAGE_UID
"""The uid and gid an OCI image's model server runs as: the image's own ``USER``."""

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "shipyard"
LABEL_DEPLOYMENT = "shipyard.dev/deployment"
LABEL_REVISION = "shipyard.dev/revision"
LABEL_GROUP = "shipyard.dev/group"
ANNOTATION_IMAGE = "shipyard.dev/image"
ANNOTATION_IMAGE_DIGEST = "shipyard.dev/image-digest"
ANNOTATION_INSTANCE_TYPE = "shipyard.dev/instance-type"
GPU_RESOURCE = "nvidia.com/gpu"

MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
"""The label selector of every object Shipyard's scheduler manages."""

# Service names are DNS-1035 labels (63 characters, a letter first); the Deployment, whose
# name the pods inherit, gets the same name.
_MAX_NAME = 63
_HASH_CHARS = 8
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_HEX_DIGEST = re.compile(r"^(sha256:)?(?P<hex>[0-9a-f]{64})$")
# registry/repository@sha256:<hex>: what a cluster build records (never a tag, so every
# pod of a revision runs the same bytes).
_PINNED_REF = re.compile(r"^(?!.*://)[^\s@]+@sha256:(?P<hex>[0-9a-f]{64})$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# The model server's own settings: spec.env must not override what the manifest sets.
_RESERVED_ENV = frozenset({"HOME", "TMPDIR", "PYTHONUNBUFFERED"})


@dataclass(frozen=True)
class PodSettings:
    """Cluster-wide settings of every revision's objects (the backend's configuration)."""

    namespace: str = DEFAULT_NAMESPACE
    service_image: str = DEFAULT_SERVICE_IMAGE
    """Runs the init container; must hold ``shipyard_scheduler`` (the Shipyard image)."""
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    """Runs the model server from the unpacked pack; needs the packs' Python at the same
    path as on the build host (``python:3.11-slim`` for packs built by the Shipyard image)."""
    object_store: str = "s3://shipyard"
    """``SHIPYARD_OBJECT_STORE`` of the init container: where the packs are."""
    s3_endpoint: str | None = None
    """``SHIPYARD_S3_ENDPOINT`` of the init container (MinIO and other S3-compatible
    servers); None leaves it to the secret or to AWS."""
    store_secret: str | None = DEFAULT_STORE_SECRET
    """Secret whose keys become the init container's environment (``envFrom``; optional,
    so clusters with workload identity may leave it out); None: no secret."""
    pull_secret: str | None = None
    """``kubernetes.io/dockerconfigjson`` secret for pulling both images."""
    grace_seconds: int = 30
    """``terminationGracePeriodSeconds``: the drain delay plus the model server's drain."""
    drain_seconds: int = 5
    """preStop sleep: the pod is out of Service endpoints and the gateway's routes before
    the model server gets SIGTERM."""
    startup_seconds: int = 600
    """How long the model may take to load before the kubelet restarts it."""
    env_size_limit: str = "4Gi"
    """``sizeLimit`` of the emptyDir holding the unpacked pack (1 GiB packs by default)."""
    tmp_size_limit: str = "2Gi"
    """``sizeLimit`` of ``/tmp`` (the downloaded pack while it unpacks, the model's files)."""

    def __post_init__(self) -> None:
        validation.name("namespace", self.namespace)
        for field, value in (
            ("service_image", self.service_image),
            ("runtime_image", self.runtime_image),
        ):
            if not value or re.search(r"\s", value):
                raise InvalidArgument(field, f"{value!r} is not an image reference")
        for field, secret in (
            ("store_secret", self.store_secret),
            ("pull_secret", self.pull_secret),
        ):
            if secret is not None:
                validation.name(field, secret)
        if self.drain_seconds < 0:
            raise InvalidArgument("drain_seconds", f"must be >= 0, got {self.drain_seconds}")
        if self.grace_seconds < self.drain_seconds + 2:
            raise InvalidArgument(
                "grace_seconds",
                f"must leave the model server at least 2 s after the {self.drain_seconds} s "
                f"drain delay, got {self.grace_seconds}",
            )
        validation.positive_int("startup_seconds", self.startup_seconds)
        for field, value in (
            ("env_size_limit", self.env_size_limit),
            ("tmp_size_limit", self.tmp_size_limit),
        ):
            if not _QUANTITY.match(value):
                raise InvalidArgument(field, f"{value!r} is not a Kubernetes quantity", "e.g. 4Gi")


def resource_name(deployment: str, revision: int) -> str:
    """``sy-<deployment>-r<revision>``: the name of the revision's Deployment and Service.

    Longer than 63 characters (a long deployment name), the deployment part is cut and an
    8-hex-digit hash of the full name keeps names of different deployments apart; the
    revision suffix stays readable.
    """
    full = f"sy-{deployment}-r{revision}"
    if len(full) <= _MAX_NAME:
        return full
    suffix = f"-r{revision}"
    digest = hashlib.sha256(full.encode()).hexdigest()[:_HASH_CHARS]
    keep = _MAX_NAME - len("sy-") - len(suffix) - _HASH_CHARS - 1
    # A cut may end on '-', which would leave '--' before the hash: legal, but ugly.
    head = deployment[:keep].rstrip("-")
    return f"sy-{head}-{digest}{suffix}"


def selector(deployment: str, revision: int) -> dict[str, str]:
    """The labels that pick one revision's pods (the Deployment's immutable selector)."""
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_DEPLOYMENT: deployment,
        LABEL_REVISION: str(revision),
    }


def labels(spec: RevisionSpec) -> dict[str, str]:
    """Labels of the revision's Deployment, Service and pods (all valid label values:
    names are DNS labels, the revision an integer)."""
    return {**selector(spec.deployment, spec.revision), LABEL_GROUP: spec.group}


def cpu_quantity(cores: float) -> str:
    """Cores as millicores, ``0.5`` → ``"500m"`` (at least ``1m``)."""
    return f"{max(1, round(cores * 1000))}m"


def memory_quantity(gib: float) -> str:
    """GiB as MiB, ``1.5`` → ``"1536Mi"`` (at least ``1Mi``)."""
    return f"{max(1, round(gib * 1024))}Mi"


def resources(cpu: float, memory_gib: float, gpu: int) -> dict[str, dict[str, str]]:
    """Requests equal to limits: pods are "Guaranteed" (last to be evicted) and an
    instance gets what the quota reserved for it, no more, no less. GPUs are an extended
    resource, for which Kubernetes requires requests equal to limits anyway."""
    amounts = {"cpu": cpu_quantity(cpu), "memory": memory_quantity(memory_gib)}
    if gpu > 0:
        amounts[GPU_RESOURCE] = str(gpu)
    return {"requests": amounts, "limits": dict(amounts)}


def _check(spec: RevisionSpec) -> str:
    """Validates what goes into the manifests; returns the image's hex digest ("" if none):
    the pack's, or the OCI image's (taken from its reference)."""
    validation.name("deployment", spec.deployment)
    validation.name("group", spec.group)
    validation.positive_int("revision", spec.revision)
    validation.positive_int("workers", spec.workers)
    if spec.replicas < 0:
        raise InvalidArgument("replicas", f"must be >= 0, got {spec.replicas}")
    if not spec.cpu > 0 or not spec.memory_gib > 0:
        raise InvalidArgument(
            "instance_type", f"{spec.instance_type!r} needs cpu and memory above 0"
        )
    if spec.gpu < 0:
        raise InvalidArgument("gpu", f"must be >= 0, got {spec.gpu}")
    for name in spec.env:
        if not _ENV_NAME.match(name) or name in _RESERVED_ENV:
            raise InvalidArgument("env", f"{name!r} cannot be set", "use another variable name")
    digest = ""
    if spec.image_digest:
        m = _HEX_DIGEST.match(spec.image_digest)
        if m is None:
            raise InvalidArgument("image_digest", f"{spec.image_digest!r} is not a sha256 digest")
        digest = m["hex"]
    if spec.image_kind not in IMAGE_KINDS:
        raise InvalidArgument(
            "image_kind", f"{spec.image_kind!r} is not an image kind", "pack or oci"
        )
    if spec.image_kind == "pack":
        validate_key(spec.pack_key, field="pack_key")
        return digest
    pinned = _PINNED_REF.match(spec.image_ref)
    if pinned is None:
        raise InvalidArgument(
            "image_ref",
            f"{spec.image_ref!r} is not an image reference pinned by digest",
            "registry/repository@sha256:<64 hex digits>, as a cluster build records it",
        )
    if digest and pinned["hex"] != digest:
        raise InvalidArgument(
            "image_ref",
            f"{spec.image_ref!r} does not pin the image's digest sha256:{digest}",
        )
    return str(pinned["hex"])


def _metadata(spec: RevisionSpec, settings: PodSettings) -> dict[str, Any]:
    return {
        "name": resource_name(spec.deployment, spec.revision),
        "namespace": settings.namespace,
        "labels": labels(spec),
        "annotations": {
            ANNOTATION_IMAGE: spec.image,
            ANNOTATION_IMAGE_DIGEST: spec.image_digest,
            ANNOTATION_INSTANCE_TYPE: spec.instance_type,
        },
    }


_MOUNT_PATHS = {
    "env": ENV_DIR,  # where a pack is unpacked (an emptyDir the init container fills)
    "tmp": "/tmp",  # noqa: S108 - the pod's emptyDir: the root filesystem is read-only
}


def _mounts(*volumes: str) -> list[dict[str, str]]:
    """Fresh ``volumeMounts`` of the pod's emptyDirs (``env``, ``tmp``)."""
    return [{"name": name, "mountPath": _MOUNT_PATHS[name]} for name in volumes]


def _restricted() -> dict[str, Any]:
    """A container security context the Pod Security "restricted" profile admits."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _init_container(spec: RevisionSpec, settings: PodSettings, digest: str) -> dict[str, Any]:
    command = [
        "python",
        "-m",
        "shipyard_scheduler.fetchpack",
        "--key",
        spec.pack_key,
        "--dest",
        ENV_DIR,
    ]
    if digest:
        command += ["--sha256", digest]
    env = [{"name": "SHIPYARD_OBJECT_STORE", "value": settings.object_store}]
    if settings.s3_endpoint:
        env.append({"name": "SHIPYARD_S3_ENDPOINT", "value": settings.s3_endpoint})
    container: dict[str, Any] = {
        "name": INIT_CONTAINER,
        "image": settings.service_image,
        "command": command,
        "env": env,
        # Unpacking needs little; the same amounts as the model container keep the pod's
        # effective request (the larger of the two) and its Guaranteed class unchanged.
        "resources": resources(spec.cpu, spec.memory_gib, 0),
        "securityContext": _restricted(),
        # fetchpack's one-line error becomes the termination message observe() reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": _mounts("env", "tmp"),
    }
    if settings.store_secret:
        # Optional: a missing secret makes the download fail with boto3's error in the
        # termination message, instead of a pod stuck in CreateContainerConfigError.
        container["envFrom"] = [{"secretRef": {"name": settings.store_secret, "optional": True}}]
    return container


def _model_container(spec: RevisionSpec, settings: PodSettings) -> dict[str, Any]:
    """The model server: a pack's from ``/env`` in the runtime image, or an OCI image's
    own (the image is the reference; its Python has the runtime, its model is in
    ``/model``)."""
    if spec.image_kind == "oci":
        image, python, model_dir = spec.image_ref, kube.MODEL_IMAGE_PYTHON, kube.MODEL_IMAGE_DIR
        mounts = _mounts("tmp")
    else:
        image, python = settings.runtime_image, f"{ENV_DIR}/bin/python"
        model_dir = f"{ENV_DIR}/model"
        mounts = _mounts("env", "tmp")
    # The model server drains (readiness 503, finishes requests in progress) within this
    # after SIGTERM; the kubelet kills it at the end of the grace period, which also
    # covers the preStop drain delay.
    graceful = settings.grace_seconds - settings.drain_seconds - 1
    command = [
        python,
        "-m",
        "shipyard_runtime",
        "serve",
        "--model-dir",
        model_dir,
        "--host",
        "0.0.0.0",  # noqa: S104 - a pod's server must listen on the pod's IP
        "--port",
        str(SERVE_PORT),
        "--workers",
        str(spec.workers),
        "--name",
        spec.deployment,
        "--graceful-timeout",
        str(graceful),
    ]
    env = [{"name": k, "value": spec.env[k]} for k in sorted(spec.env)]
    env += [
        # The root filesystem is read-only: libraries that cache under $HOME write to /tmp.
        {"name": "HOME", "value": "/tmp"},  # noqa: S108 - an emptyDir of the pod's own
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    return {
        "name": CONTAINER,
        "image": image,
        "command": command,
        "env": env,
        "ports": [{"name": "http", "containerPort": SERVE_PORT, "protocol": "TCP"}],
        "resources": resources(spec.cpu, spec.memory_gib, spec.gpu),
        # The server binds its socket before the workers load the model, and answers only
        # once they have: the startup probe gives loading startup_seconds, and liveness
        # (which would restart a slow loader) starts after it has passed.
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": max(1, -(-settings.startup_seconds // 5)),
        },
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "lifecycle": {
            # Endpoints and the gateway's routes drop a terminating pod asynchronously;
            # SIGTERM comes only after this, so no request reaches a closed socket. The
            # env's own Python sleeps: the runtime image need not have a `sleep` binary
            # (and the native sleep action needs Kubernetes 1.30).
            "preStop": {
                "exec": {
                    "command": [python, "-c", f"import time; time.sleep({settings.drain_seconds})"]
                }
            }
        },
        "securityContext": _restricted(),
        # The last exit's log lines become the termination message observe() reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }


def deployment_manifest(spec: RevisionSpec, settings: PodSettings) -> dict[str, Any]:
    """The revision's Deployment: ``spec.replicas`` pods of the image's model server (a
    pack's, fetched by an init container; or an OCI image's, run as it is).

    ``InvalidArgument`` when the spec holds something the manifest cannot carry (names
    that are not DNS labels, a malformed key, digest or reference, a reserved environment
    variable).
    """
    digest = _check(spec)
    metadata = _metadata(spec, settings)
    oci = spec.image_kind == "oci"
    run_as = OCI_RUN_AS if oci else RUN_AS
    tmp = {"name": "tmp", "emptyDir": {"sizeLimit": settings.tmp_size_limit}}
    pod: dict[str, Any] = {
        # The model's code never talks to the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": run_as,
            "runAsGroup": run_as,
            "fsGroup": run_as,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod["containers"] = [_model_container(spec, settings)]
    pod["volumes"] = [tmp]
    if not oci:  # (an OCI image holds the model and its environment: nothing to fetch)
        pod["initContainers"] = [_init_container(spec, settings, digest)]
        pod["volumes"].insert(
            0, {"name": "env", "emptyDir": {"sizeLimit": settings.env_size_limit}}
        )
    if settings.pull_secret:
        # Also the login to the registry an OCI image was pushed to.
        pod["imagePullSecrets"] = [{"name": settings.pull_secret}]
    if spec.gpu > 0:
        # GPU nodes are commonly tainted so that only pods asking for GPUs land there.
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector(spec.deployment, spec.revision)},
            # A revision's template only changes with the backend's settings (images,
            # secrets); such a roll keeps every ready pod until its replacement is ready.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
            },
            "revisionHistoryLimit": 2,
            "template": {
                "metadata": {
                    "labels": labels(spec),
                    "annotations": dict(metadata["annotations"]),
                },
                "spec": pod,
            },
        },
    }


def service_manifest(spec: RevisionSpec, settings: PodSettings) -> dict[str, Any]:
    """The revision's ClusterIP Service, port 80 to the model server's 8080: a stable
    in-cluster address for the revision (the gateway routes to pod addresses itself)."""
    _check(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, settings),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(spec.deployment, spec.revision),
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


__all__ = [
    "CONTAINER",
    "DEFAULT_NAMESPACE",
    "DEFAULT_RUNTIME_IMAGE",
    "DEFAULT_SERVICE_IMAGE",
    "DEFAULT_STORE_SECRET",
    "ENV_DIR",
    "GPU_RESOURCE",
    "IMAGE_KINDS",
    "INIT_CONTAINER",
    "LABEL_DEPLOYMENT",
    "LABEL_GROUP",
    "LABEL_MANAGED_BY",
    "LABEL_REVISION",
    "MANAGED_BY",
    "MANAGED_SELECTOR",
    "OCI_RUN_AS",
    "RUN_AS",
    "SERVE_PORT",
    "SERVICE_PORT",
    "PodSettings",
    "cpu_quantity",
    "deployment_manifest",
    "labels",
    "memory_quantity",
    "resource_name",
    "resources",
    "selector",
    "service_manifest",
]
