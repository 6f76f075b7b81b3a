"""The scheduler's events (see docs/events.md): version 1 each, but ``DeploymentCreated``
and ``DeploymentUpdated``, version 2 since their spec says what kind of image it runs
(``image_kind``, ``image_ref``), with upcasters from version 1.

Deployment streams (``deployment:<name>``) hold what users decided and what the
reconciler concluded (activations, status); instance streams (``instance:<id>``) hold
what the runtime backend observed. A deployment's revision is the full spec a user
asked for; scaling is not a revision (as in Kubernetes), so autoscaling never makes one.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict

from shipyard_core.aggregate import DomainEvent, EventRegistry
from shipyard_core.eventstore import Upcasters

ImageKind = Literal["pack", "oci"]
IMAGE_KINDS: tuple[ImageKind, ...] = get_args(ImageKind)
"""Every image kind this scheduler runs."""
"""What a revision runs: an environment pack from the object store (``pack``) or an OCI
image from a registry (``oci``, built on a cluster; only the kubernetes backend runs it)."""


class Spec(BaseModel):
    """Everything one revision runs with (the resolved image and instance type included,
    so history and replays never depend on another service's current state)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_name: str
    image_version: int
    image_digest: str
    """sha256 (hex) of the pack, or of the OCI image's manifest."""
    pack_key: str
    """Object store key of the pack (empty for an OCI image)."""
    workers: int
    python: str
    instance_type: str
    cpu: float
    memory_gib: float
    gpu: int
    min_replicas: int
    max_replicas: int
    target_inflight: int
    access: str
    """``private`` or ``public``."""
    description: str
    metadata: dict[str, str]
    image_kind: ImageKind = "pack"
    """``pack`` or ``oci`` (events of version 2)."""
    image_ref: str = ""
    """The OCI image pinned by digest (``registry/repo@sha256:<hex>``); empty for a pack
    (events of version 2)."""

    @property
    def image(self) -> str:
        """``name:version``."""
        return f"{self.image_name}:{self.image_version}"


class DeploymentCreated(DomainEvent):
    """A deployment exists, at revision 1 (again after a delete: same name, new life).
    Version 2: the spec has ``image_kind`` and ``image_ref``."""

    schema_version: ClassVar[int] = 2

    group: str
    revision: int
    spec: Spec
    replicas: int
    readme: str
    created_by: str


class DeploymentUpdated(DomainEvent):
    """A new revision: rolled out with no downtime by the reconciler. Version 2: the spec
    has ``image_kind`` and ``image_ref``."""

    schema_version: ClassVar[int] = 2

    revision: int
    spec: Spec
    replicas: int
    message: str
    changed: list[str]


class DeploymentScaled(DomainEvent):
    """The owner changed the replica range (no new revision)."""

    min_replicas: int
    max_replicas: int
    target_inflight: int
    replicas: int


class DeploymentAutoscaled(DomainEvent):
    """The autoscaler (or an activation) moved the target within the range."""

    replicas: int
    reason: str


class DeploymentStopped(DomainEvent):
    """Stopped by its owner: instances stop, quota is released, the definition stays."""


class DeploymentStarted(DomainEvent):
    """Started again: the newest revision runs (a failed one gets another chance)."""

    replicas: int


class DeploymentDeleted(DomainEvent):
    """Removed; history, instances and metrics stay readable."""


class DeploymentReadmeSet(DomainEvent):
    """The readme (GitHub-flavoured Markdown) was edited."""

    markdown: str


class RevisionActivated(DomainEvent):
    """Traffic moved to this revision (its instances were ready)."""

    revision: int


class DeploymentStatusChanged(DomainEvent):
    """The reconciler's conclusion: ``deployed`` or ``failed`` (with why)."""

    status: str
    revision: int
    message: str


class InstanceCreated(DomainEvent):
    """An instance of a revision was scheduled on a backend (``pending``)."""

    deployment: str
    revision: int
    backend: str


class InstanceStarting(DomainEvent):
    """Its process or pod runs; the readiness check does not pass yet."""

    address: str
    restarts: int


class InstanceReady(DomainEvent):
    """It passes its readiness check: routable."""

    address: str


class InstanceFailed(DomainEvent):
    """It exited (it will be restarted with backoff unless the revision failed)."""

    restarts: int
    message: str


class InstanceTerminated(DomainEvent):
    """Stopped on purpose, or gone."""

    reason: str


SCHEDULER_EVENTS = EventRegistry(
    DeploymentCreated,
    DeploymentUpdated,
    DeploymentScaled,
    DeploymentAutoscaled,
    DeploymentStopped,
    DeploymentStarted,
    DeploymentDeleted,
    DeploymentReadmeSet,
    RevisionActivated,
    DeploymentStatusChanged,
    InstanceCreated,
    InstanceStarting,
    InstanceReady,
    InstanceFailed,
    InstanceTerminated,
)


SCHEDULER_UPCASTERS = Upcasters()
"""Upcasters of the scheduler's stored events, used by its event store and projection."""

SPEC_V1_DEFAULTS: dict[str, str] = {"image_kind": "pack", "image_ref": ""}
"""What a version 1 spec meant by the fields version 2 added."""


@SCHEDULER_UPCASTERS.register("DeploymentCreated", 1)
@SCHEDULER_UPCASTERS.register("DeploymentUpdated", 1)
def _spec_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 1 specs ran environment packs only: kind ``pack``, no image reference."""
    return {**payload, "spec": {**payload["spec"], **SPEC_V1_DEFAULTS}}
