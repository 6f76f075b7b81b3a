"""The Deployment aggregate (what its owner asked for and what the reconciler concluded)
and the Instance aggregate (one instance's life as the runtime backend reported it)."""

from __future__ import annotations

import enum

from shipyard_core.aggregate import Aggregate, DomainEvent
from shipyard_core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from shipyard_scheduler.domain.events import (
    DeploymentAutoscaled,
    DeploymentCreated,
    DeploymentDeleted,
    DeploymentReadmeSet,
    DeploymentScaled,
    DeploymentStarted,
    DeploymentStatusChanged,
    DeploymentStopped,
    DeploymentUpdated,
    InstanceCreated,
    InstanceFailed,
    InstanceReady,
    InstanceStarting,
    InstanceTerminated,
    RevisionActivated,
    Spec,
)

MAX_REPLICAS = 100


class Status(enum.StrEnum):
    """A deployment's status."""

    NEW = "new"
    DEPLOYING = "deploying"
    DEPLOYED = "deployed"
    FAILED = "failed"
    STOPPED = "stopped"
    DELETED = "deleted"


def check_scaling(min_replicas: int, max_replicas: int, target_inflight: int) -> None:
    """Refuses a replica range that cannot work, naming the fix."""
    if min_replicas < 0:
        raise InvalidArgument("min_replicas", "must be 0 or more (0 allows scale to zero)")
    if max_replicas < 1:
        raise InvalidArgument("max_replicas", "must be at least 1")
    if max_replicas > MAX_REPLICAS:
        raise InvalidArgument("max_replicas", f"must be at most {MAX_REPLICAS}")
    if min_replicas > max_replicas:
        raise InvalidArgument(
            "min_replicas",
            f"({min_replicas}) is above max_replicas ({max_replicas}); give --min <= --max",
        )
    if target_inflight < 0:
        raise InvalidArgument("target_inflight", "must be 0 (the default) or more")


def initial_replicas(min_replicas: int, max_replicas: int) -> int:
    """Where a (re)started deployment begins: its minimum, but at least one instance so
    that it is ready to serve (an idle one scales back to zero later)."""
    return max(min_replicas, 1) if max_replicas > 0 else 0


class Deployment(Aggregate):
    """One named deployment (id = name, unique on the platform)."""

    aggregate_type = "deployment"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.status = Status.NEW
        self.group = ""
        self.created_by = ""
        self.revision = 0
        self.active_revision = 0
        self.failed_revision = 0
        self.specs: dict[int, Spec] = {}
        self.replicas = 0
        self.min_replicas = 0
        self.max_replicas = 0
        self.target_inflight = 0
        self.readme = ""

    # -- reading -------------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """Created and not deleted."""
        return self.status not in (Status.NEW, Status.DELETED)

    @property
    def stopped(self) -> bool:
        """Stopped by its owner."""
        return self.status is Status.STOPPED

    @property
    def spec(self) -> Spec:
        """The newest revision's spec."""
        return self.specs[self.revision]

    def require_live(self) -> None:
        """Raises NotFound unless the deployment exists."""
        if not self.live:
            raise NotFound(f"deployment {self.id!r} does not exist; see `shipyard deploy list`")

    # -- owner commands ------------------------------------------------------------------

    def create(self, group: str, spec: Spec, readme: str, created_by: str) -> None:
        """Creates the deployment at revision 1."""
        if self.live:
            raise AlreadyExists(
                f"deployment {self.id!r} exists already (group {self.group}); "
                "pick another name or update it with `shipyard deploy update`"
            )
        check_scaling(spec.min_replicas, spec.max_replicas, spec.target_inflight)
        self.emit(
            DeploymentCreated(
                group=group,
                revision=self.revision + 1,
                spec=spec,
                replicas=initial_replicas(spec.min_replicas, spec.max_replicas),
                readme=readme,
                created_by=created_by,
            )
        )

    def update(self, spec: Spec, message: str) -> list[str]:
        """Makes a new revision with ``spec``; returns the names of what changed."""
        self.require_live()
        check_scaling(spec.min_replicas, spec.max_replicas, spec.target_inflight)
        old = self.spec.model_dump()
        changed = [k for k, v in spec.model_dump().items() if old[k] != v]
        if not changed:
            raise FailedPrecondition(
                f"the update changes nothing in deployment {self.id!r}; "
                "give at least one new value (e.g. --image NAME:VERSION)"
            )
        replicas = min(max(self.replicas, spec.min_replicas), spec.max_replicas)
        if self.stopped:
            replicas = 0
        self.emit(
            DeploymentUpdated(
                revision=self.revision + 1,
                spec=spec,
                replicas=replicas,
                message=message,
                changed=changed,
            )
        )
        return changed

    def scale(self, min_replicas: int, max_replicas: int, target_inflight: int) -> None:
        """Sets the replica range (no new revision)."""
        self.require_live()
        check_scaling(min_replicas, max_replicas, target_inflight)
        replicas = min(max(self.replicas, min_replicas), max_replicas)
        if min_replicas == max_replicas:
            replicas = min_replicas
        if self.stopped:
            replicas = 0
        self.emit(
            DeploymentScaled(
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                target_inflight=target_inflight,
                replicas=replicas,
            )
        )

    def stop(self) -> None:
        """Stops it (the definition stays)."""
        self.require_live()
        if self.stopped:
            raise FailedPrecondition(f"deployment {self.id!r} is stopped already")
        self.emit(DeploymentStopped())

    def start(self) -> None:
        """Starts the newest revision again."""
        self.check_startable()
        replicas = initial_replicas(self.min_replicas, self.max_replicas)
        self.emit(DeploymentStarted(replicas=replicas))

    def check_startable(self) -> None:
        """Raises unless the deployment is stopped or failed."""
        self.require_live()
        if not self.stopped and self.status is not Status.FAILED:
            raise FailedPrecondition(
                f"deployment {self.id!r} is {self.status}, not stopped; "
                "`shipyard deploy stop` it first, or `shipyard deploy update` it"
            )

    def delete(self) -> None:
        """Deletes it (history stays)."""
        self.require_live()
        self.emit(DeploymentDeleted())

    def set_readme(self, markdown: str) -> None:
        """Replaces the readme."""
        self.require_live()
        self.emit(DeploymentReadmeSet(markdown=markdown))

    # -- reconciler and autoscaler -------------------------------------------------------

    def autoscale(self, replicas: int, reason: str) -> bool:
        """Moves the target within the range; False when there is nothing to do."""
        if not self.live or self.stopped:
            return False
        replicas = min(max(replicas, self.min_replicas), self.max_replicas)
        if replicas == self.replicas:
            return False
        self.emit(DeploymentAutoscaled(replicas=replicas, reason=reason))
        return True

    def activate(self, revision: int) -> None:
        """Moves traffic to ``revision``."""
        if self.live and revision != self.active_revision and revision in self.specs:
            self.emit(RevisionActivated(revision=revision))

    def conclude(self, status: Status, message: str = "") -> bool:
        """Records the reconciler's conclusion about the newest revision; False when it
        says nothing new."""
        if not self.live or self.stopped:
            return False
        if self.status is status and (
            status is not Status.FAILED or self.failed_revision == self.revision
        ):
            return False
        self.emit(DeploymentStatusChanged(status=status, revision=self.revision, message=message))
        return True

    def apply(self, event: DomainEvent) -> None:
        if isinstance(event, DeploymentCreated):
            self.status = Status.DEPLOYING
            self.group = event.group
            self.created_by = event.created_by
            self.revision = event.revision
            self.active_revision = event.revision
            self.failed_revision = 0
            self.specs[event.revision] = event.spec
            self._range_of(event.spec)
            self.replicas = event.replicas
            self.readme = event.readme
        elif isinstance(event, DeploymentUpdated):
            self.revision = event.revision
            self.specs[event.revision] = event.spec
            self._range_of(event.spec)
            self.replicas = event.replicas
            if not self.stopped:
                self.status = Status.DEPLOYING
        elif isinstance(event, DeploymentScaled):
            self._range(event.min_replicas, event.max_replicas, event.target_inflight)
            self.replicas = event.replicas
            if not self.stopped and self.status is Status.DEPLOYED:
                self.status = Status.DEPLOYING
        elif isinstance(event, DeploymentAutoscaled):
            self.replicas = event.replicas
        elif isinstance(event, DeploymentStopped):
            self.status = Status.STOPPED
            self.replicas = 0
        elif isinstance(event, DeploymentStarted):
            self.status = Status.DEPLOYING
            self.failed_revision = 0
            self.replicas = event.replicas
        elif isinstance(event, DeploymentDeleted):
            self.status = Status.DELETED
            self.replicas = 0
        elif isinstance(event, DeploymentReadmeSet):
            self.readme = event.markdown
        elif isinstance(event, RevisionActivated):
            self.active_revision = event.revision
        elif isinstance(event, DeploymentStatusChanged):
            self.status = Status(event.status)
            if self.status is Status.FAILED:
                self.failed_revision = event.revision

    def _range_of(self, spec: Spec) -> None:
        self._range(spec.min_replicas, spec.max_replicas, spec.target_inflight)

    def _range(self, min_replicas: int, max_replicas: int, target_inflight: int) -> None:
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.target_inflight = target_inflight


class InstanceState(enum.StrEnum):
    """An instance's status."""

    NEW = "new"
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    TERMINATED = "terminated"


class Instance(Aggregate):
    """One instance (id from the backend: ``<deployment>-r<rev>-<suffix>`` or a pod name)."""

    aggregate_type = "instance"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.state = InstanceState.NEW
        self.address = ""
        self.restarts = 0
        self.last_failure = ""

    def created(self, deployment: str, revision: int, backend: str) -> None:
        """The backend scheduled it."""
        if self.state is InstanceState.NEW:
            self.emit(InstanceCreated(deployment=deployment, revision=revision, backend=backend))

    def starting(self, address: str, restarts: int) -> None:
        """It runs, not ready yet."""
        if self.state is not InstanceState.STARTING or address != self.address:
            self.emit(InstanceStarting(address=address, restarts=restarts))

    def ready(self, address: str) -> None:
        """It passes its readiness check."""
        if self.state is not InstanceState.READY or address != self.address:
            self.emit(InstanceReady(address=address))

    def failed(self, restarts: int, message: str) -> None:
        """It exited."""
        if self.state is not InstanceState.FAILED or restarts != self.restarts:
            self.emit(InstanceFailed(restarts=restarts, message=message[-4000:]))

    def terminated(self, reason: str) -> None:
        """It is gone."""
        if self.state not in (InstanceState.NEW, InstanceState.TERMINATED):
            self.emit(InstanceTerminated(reason=reason))

    def apply(self, event: DomainEvent) -> None:
        if isinstance(event, InstanceCreated):
            self.state = InstanceState.PENDING
        elif isinstance(event, InstanceStarting):
            self.state = InstanceState.STARTING
            self.address = event.address
            self.restarts = event.restarts
        elif isinstance(event, InstanceReady):
            self.state = InstanceState.READY
            self.address = event.address
        elif isinstance(event, InstanceFailed):
            self.state = InstanceState.FAILED
            self.restarts = event.restarts
            self.last_failure = event.message
        elif isinstance(event, InstanceTerminated):
            self.state = InstanceState.TERMINATED
