"""The runtime backend interface: how the reconciler turns revisions into instances.

A backend is level-triggered, like a Kubernetes controller: the reconciler calls
:meth:`RuntimeBackend.apply` with every revision that should run (on every pass, so it
must be idempotent and cheap), :meth:`RuntimeBackend.remove` for revisions that should
not, and reads the facts back with :meth:`RuntimeBackend.observe`. The backend keeps
crashed instances restarting with backoff by itself (kubelet semantics: the instance
stays, its ``restarts`` grows); the reconciler decides when a crash loop fails the
deployment. Instances must survive a restart of the scheduler: :meth:`RuntimeBackend.open`
adopts what is still running.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class InstancePhase(enum.StrEnum):
    """Where an instance is (the ``InstanceStatus`` of the API)."""

    PENDING = "pending"
    """Accepted, not started yet (fetching the image, waiting for a node)."""
    STARTING = "starting"
    """The process or pod runs but its readiness check does not pass yet."""
    READY = "ready"
    """Passes its readiness check: the gateway may route to it."""
    FAILED = "failed"
    """Exited (or crash-looping) and waiting for its next restart."""
    TERMINATED = "terminated"
    """Stopped on purpose, or gone."""


@dataclass(frozen=True)
class RevisionSpec:
    """One revision of a deployment, as the backend needs it."""

    deployment: str
    """The deployment name (unique on the platform; DNS-1123 label rules)."""
    group: str
    revision: int
    replicas: int
    """How many instances of this revision should run (0 is allowed)."""
    image: str
    """``name:version`` of the image, for labels and messages."""
    image_digest: str
    """sha256 of the environment pack, or of the OCI image's manifest."""
    pack_key: str
    """Object store key of the environment pack (empty for an OCI image)."""
    workers: int
    """Model server worker processes per instance."""
    instance_type: str
    cpu: float
    """Cores per instance (the instance type's)."""
    memory_gib: float
    gpu: int
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the model server."""
    image_kind: str = "pack"
    """``pack`` (an environment pack at ``pack_key``) or ``oci`` (the OCI image
    ``image_ref``, built on a cluster; only the kubernetes backend runs it)."""
    image_ref: str = ""
    """The OCI image pinned by digest (``registry/repo@sha256:<hex>``); empty for a pack."""

    @property
    def key(self) -> str:
        """``<deployment>-r<revision>``: the revision's name in the backend."""
        return f"{self.deployment}-r{self.revision}"


@dataclass(frozen=True)
class ObservedInstance:
    """One instance as the backend sees it now."""

    instance_id: str
    """Stable for the instance's life, across restarts (``<deployment>-r<rev>-<suffix>``)."""
    deployment: str
    revision: int
    phase: InstancePhase
    address: str = ""
    """``host:port`` of the model server once known."""
    restarts: int = 0
    """How many times the model server was restarted after exiting."""
    message: str = ""
    """Why it is not ready: the last exit with the last log lines, or a pod condition."""


class RuntimeBackend(Protocol):
    """Runs revisions as instances: ``local`` processes or ``kubernetes`` pods."""

    name: str
    """``local`` or ``kubernetes``: recorded with every instance."""

    async def open(self) -> None:
        """Prepares the backend and adopts instances that survived a scheduler restart."""
        ...

    async def apply(self, spec: RevisionSpec) -> None:
        """Makes exactly ``spec.replicas`` instances of ``spec`` exist (starts missing
        ones, stops extra ones, newest or not-ready first). Idempotent; returns without
        waiting for readiness."""
        ...

    async def remove(self, deployment: str, revision: int) -> None:
        """Stops every instance of a revision gracefully (SIGTERM, then the kill after the
        grace period) and forgets it. Unknown revisions are a no-op."""
        ...

    async def revisions(self) -> set[tuple[str, int]]:
        """Every revision the backend runs, as ``(deployment, revision)``, whether or not
        it has instances (a Kubernetes Deployment whose pods cannot be created has none,
        and must still be removed when it is no longer wanted)."""
        ...

    async def observe(self) -> list[ObservedInstance]:
        """Every instance this backend runs now (not the removed ones)."""
        ...

    async def logs_tail(self, instance_id: str, lines: int = 50) -> str:
        """The last ``lines`` lines the instance wrote (stdout and stderr), or ``""``."""
        ...

    def on_change(self, wake: Callable[[], None]) -> None:
        """Registers ``wake``, called whenever an instance's phase changes, so the
        reconciler looks at once rather than at its next interval. A backend that cannot
        tell may ignore it (the reconciler still looks every interval)."""
        ...

    async def close(self) -> None:
        """Stops supervising; running instances keep running (a restarted scheduler
        adopts them)."""
        ...
