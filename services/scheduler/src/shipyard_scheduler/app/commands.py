"""The scheduler's commands. Each checks the caller's permission and its input, reserves
or releases quota, and records its decision as events.

Quota first, events second: a command reserves (or resizes the deployment's one
reservation) before it appends, and undoes the reservation when the append fails, so a
refused or conflicting command leaves nothing half-done. Releases happen after the
event (the deployment stops using the resources first); a failed release is reported and
repeating the command releases again."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from shipyard_core import validation
from shipyard_core.aggregate import Repository, retry_on_conflict
from shipyard_core.auth import Principal, resolve_group
from shipyard_core.errors import FailedPrecondition, InvalidArgument, ShipyardError, Unavailable
from shipyard_core.eventstore import EventStore, StoredEvent
from shipyard_core.projections.consistency import wait_until_projected
from shipyard_scheduler.adapters.peers import InstanceTypeInfo, Peers, ResolvedImage
from shipyard_scheduler.app.queries import DeploymentQueries, not_found
from shipyard_scheduler.app.views import DeploymentView, ReadmeView
from shipyard_scheduler.domain import SCHEDULER_EVENTS, Deployment, Spec
from shipyard_scheduler.projections import SCHEMA, DeploymentsProjection

MAX_README_BYTES = 256 * 1024
MAX_DESCRIPTION = 2000
MAX_MESSAGE = 2000
MAX_METADATA = 64
OCI_BACKENDS = frozenset({"kubernetes"})
"""The runtime backends that run OCI images (``local`` runs environment packs only)."""


@dataclass(frozen=True)
class Scaling:
    """A replica range; ``None`` fields keep the current value on update."""

    min_replicas: int | None = None
    max_replicas: int | None = None
    target_inflight: int | None = None


@dataclass(frozen=True)
class SpecChange:
    """What a create gives, or what an update changes (``None``: unchanged)."""

    image: str | None = None
    instance_type: str | None = None
    scaling: Scaling | None = None
    access: str | None = None
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    clear_metadata: bool = False


def check_name(name: str) -> str:
    """A deployment name: it is part of every prediction URL and of Kubernetes names."""
    return validation.deployment_name("name", name)


def _image_of(spec: Spec) -> ResolvedImage:
    """The image a revision runs, as resolved when it was made."""
    return ResolvedImage(
        spec.image_name,
        spec.image_version,
        spec.image_digest,
        spec.pack_key,
        spec.workers,
        spec.python,
        spec.image_kind,
        spec.image_ref,
    )


def _check_change(change: SpecChange) -> None:
    if change.access is not None and change.access not in ("private", "public"):
        raise InvalidArgument(
            "access", f"{change.access!r} is not an access mode", "use private or public"
        )
    if change.description is not None and len(change.description) > MAX_DESCRIPTION:
        raise InvalidArgument("description", f"is longer than {MAX_DESCRIPTION} characters")
    if len(change.metadata) > MAX_METADATA:
        raise InvalidArgument("metadata", f"has more than {MAX_METADATA} keys")
    for key, value in change.metadata.items():
        if not key or len(key) > 63 or len(value) > 1000:
            raise InvalidArgument(
                "metadata",
                f"key {key!r} is empty or too long",
                "keys up to 63 characters, values up to 1000",
            )


class DeploymentCommands:
    """Create, update, stop, start, scale, delete, readme; and the gateway's Activate."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: EventStore,
        peers: Peers,
        queries: DeploymentQueries,
        *,
        default_target_inflight: int = 4,
        projection_wait_seconds: float = 5.0,
        runtime_backend: str = "local",
    ) -> None:
        self.pool = pool
        self.store = store
        self.peers = peers
        self.queries = queries
        self.default_target_inflight = default_target_inflight
        self.projection_wait_seconds = projection_wait_seconds
        self.runtime_backend = runtime_backend
        """The backend the reconciler drives (``local`` or ``kubernetes``): what it cannot
        run is refused before anything is reserved or recorded."""
        self.deployments = Repository(store, Deployment, SCHEDULER_EVENTS)

    async def _load_own(self, caller: Principal, name: str) -> Deployment:
        check_name(name)
        deployment = await self.deployments.load(name)
        if not deployment.live or not caller.can_see(deployment.group):
            raise not_found(name)
        return deployment

    def _check_runnable(self, image: ResolvedImage) -> None:
        """Refuses an image the runtime backend cannot run: an OCI image (built on a
        cluster) runs only on the kubernetes backend; packs run on both."""
        if image.kind == "oci" and self.runtime_backend not in OCI_BACKENDS:
            raise FailedPrecondition(
                f"image {image.ref} is a container image built for a cluster (kind oci); "
                f"the {self.runtime_backend} runtime runs environment packs: build it with "
                "build_backend=local (SHIPYARD_BUILD_BACKEND), or run the scheduler with "
                "runtime_backend=kubernetes (SHIPYARD_RUNTIME_BACKEND)"
            )

    def _spec(
        self,
        image: ResolvedImage,
        itype: InstanceTypeInfo,
        scaling: Scaling,
        access: str,
        description: str,
        metadata: dict[str, str],
    ) -> Spec:
        return Spec(
            image_name=image.name,
            image_version=image.version,
            image_digest=image.digest,
            pack_key=image.pack_key,
            image_kind=image.kind,
            image_ref=image.image_ref,
            workers=image.workers,
            python=image.python,
            instance_type=itype.name,
            cpu=itype.cpu,
            memory_gib=itype.memory_gib,
            gpu=itype.gpu,
            min_replicas=scaling.min_replicas if scaling.min_replicas is not None else 1,
            max_replicas=scaling.max_replicas if scaling.max_replicas is not None else 1,
            target_inflight=scaling.target_inflight or self.default_target_inflight,
            access=access,
            description=description,
            metadata=dict(sorted(metadata.items())),
        )

    async def _guarded(
        self,
        reserve: Callable[[], Awaitable[None]] | None,
        undo: Callable[[], Awaitable[None]] | None,
        command: Callable[[], Awaitable[list[StoredEvent]]],
    ) -> list[StoredEvent]:
        """Reserves, then runs the command; undoes the reservation when it fails."""
        if reserve is not None:
            await reserve()
        try:
            return await retry_on_conflict(command)
        except BaseException:
            if undo is not None:
                # The command's own error is the one the caller needs.
                with contextlib.suppress(ShipyardError):
                    await undo()
            raise

    async def create(
        self,
        caller: Principal,
        token: str,
        name: str,
        group: str,
        change: SpecChange,
        readme: str = "",
    ) -> DeploymentView:
        """Creates a deployment (revision 1) after reserving its maximum replicas."""
        check_name(name)
        group = resolve_group(caller, group)
        _check_change(change)
        if len(readme.encode()) > MAX_README_BYTES:
            raise InvalidArgument("readme", "is larger than 256 KiB")
        if not change.image:
            raise InvalidArgument("image", "is required", "give NAME:VERSION, e.g. iris:1")
        existing = await self.deployments.load(name)
        if existing.live:
            if caller.can_see(existing.group):
                existing.create(group, existing.spec, "", caller.user)  # raises AlreadyExists
            raise FailedPrecondition(f"the name {name!r} is taken; pick another deployment name")
        image = await self.peers.image(token, group, change.image)
        self._check_runnable(image)
        itype = await self.peers.instance_type(token, change.instance_type or "")
        spec = self._spec(
            image,
            itype,
            change.scaling or Scaling(),
            change.access or "private",
            change.description or "",
            change.metadata,
        )
        Deployment(name).create(group, spec, readme, caller.user)  # validates before reserving

        async def command() -> list[StoredEvent]:
            deployment = await self.deployments.load(name)
            deployment.create(group, spec, readme, caller.user)
            return await self.deployments.save(deployment)

        events = await self._guarded(
            lambda: self.peers.reserve(token, group, name, itype.name, spec.max_replicas),
            lambda: self.peers.release(token, group, name),
            command,
        )
        return await self._answer(caller, name, events)

    async def update(
        self, caller: Principal, token: str, name: str, change: SpecChange, message: str = ""
    ) -> DeploymentView:
        """Makes a new revision from the current one and ``change``."""
        _check_change(change)
        if len(message) > MAX_MESSAGE:
            raise InvalidArgument("message", f"is longer than {MAX_MESSAGE} characters")
        current = await self._load_own(caller, name)
        old = current.spec
        image = (
            await self.peers.image(token, current.group, change.image)
            if change.image
            else _image_of(old)
        )
        # Also an image kept from the current revision: the backend may have changed.
        self._check_runnable(image)
        itype = (
            await self.peers.instance_type(token, change.instance_type)
            if change.instance_type and change.instance_type != old.instance_type
            else InstanceTypeInfo(old.instance_type, old.cpu, old.memory_gib, old.gpu)
        )
        s = change.scaling or Scaling()
        scaling = Scaling(
            s.min_replicas if s.min_replicas is not None else current.min_replicas,
            s.max_replicas if s.max_replicas is not None else current.max_replicas,
            s.target_inflight or current.target_inflight,
        )
        metadata = {} if change.clear_metadata else dict(old.metadata)
        metadata.update(change.metadata)
        spec = self._spec(
            image,
            itype,
            scaling,
            change.access or old.access,
            change.description if change.description is not None else old.description,
            metadata,
        )
        probe = await self.deployments.load(name)
        probe.update(spec, message)  # validates (and "changes nothing") before reserving
        resize = not current.stopped and (
            itype.name != old.instance_type or spec.max_replicas != current.max_replicas
        )

        async def command() -> list[StoredEvent]:
            deployment = await self._load_own(caller, name)
            deployment.update(spec, message)
            return await self.deployments.save(deployment)

        events = await self._guarded(
            (lambda: self.peers.reserve(token, current.group, name, itype.name, spec.max_replicas))
            if resize
            else None,
            (
                lambda: self.peers.reserve(
                    token, current.group, name, old.instance_type, current.max_replicas
                )
            )
            if resize
            else None,
            command,
        )
        return await self._answer(caller, name, events)

    async def scale(
        self, caller: Principal, token: str, name: str, scaling: Scaling
    ) -> DeploymentView:
        """Sets the replica range; growing the maximum reserves first."""
        current = await self._load_own(caller, name)
        new_min = scaling.min_replicas if scaling.min_replicas is not None else current.min_replicas
        new_max = scaling.max_replicas if scaling.max_replicas is not None else current.max_replicas
        target = scaling.target_inflight or current.target_inflight
        probe = await self.deployments.load(name)
        probe.scale(new_min, new_max, target)  # validates before reserving
        itype = current.spec.instance_type
        resize = not current.stopped and new_max != current.max_replicas

        async def command() -> list[StoredEvent]:
            deployment = await self._load_own(caller, name)
            deployment.scale(new_min, new_max, target)
            return await self.deployments.save(deployment)

        events = await self._guarded(
            (lambda: self.peers.reserve(token, current.group, name, itype, new_max))
            if resize
            else None,
            (lambda: self.peers.reserve(token, current.group, name, itype, current.max_replicas))
            if resize
            else None,
            command,
        )
        return await self._answer(caller, name, events)

    async def stop(self, caller: Principal, token: str, name: str) -> DeploymentView:
        """Stops every instance and releases the quota; stopping a stopped deployment
        releases again (in case the first release did not go through)."""
        current = await self._load_own(caller, name)
        events: list[StoredEvent] = []
        if not current.stopped:

            async def command() -> list[StoredEvent]:
                deployment = await self._load_own(caller, name)
                if deployment.stopped:
                    return []
                deployment.stop()
                return await self.deployments.save(deployment)

            events = await retry_on_conflict(command)
        await self._release(token, current.group, name, "stopped")
        return await self._answer(caller, name, events)

    async def start(self, caller: Principal, token: str, name: str) -> DeploymentView:
        """Reserves the quota again and starts the newest revision."""
        current = await self._load_own(caller, name)
        current.check_startable()  # before reserving
        spec = current.spec
        self._check_runnable(_image_of(spec))

        async def command() -> list[StoredEvent]:
            deployment = await self._load_own(caller, name)
            deployment.start()
            return await self.deployments.save(deployment)

        events = await self._guarded(
            lambda: self.peers.reserve(
                token, current.group, name, spec.instance_type, current.max_replicas
            ),
            (lambda: self.peers.release(token, current.group, name)) if current.stopped else None,
            command,
        )
        return await self._answer(caller, name, events)

    async def delete(self, caller: Principal, token: str, name: str) -> None:
        """Deletes the deployment (history stays) and releases its quota."""
        current = await self._load_own(caller, name)

        async def command() -> list[StoredEvent]:
            deployment = await self._load_own(caller, name)
            deployment.delete()
            return await self.deployments.save(deployment)

        events = await retry_on_conflict(command)
        await self._release(token, current.group, name, "deleted")
        await self._visible(events)

    async def set_readme(self, caller: Principal, name: str, markdown: str) -> ReadmeView:
        """Replaces the readme."""
        if len(markdown.encode()) > MAX_README_BYTES:
            raise InvalidArgument("markdown", "is larger than 256 KiB")
        await self._load_own(caller, name)

        async def command() -> list[StoredEvent]:
            deployment = await self._load_own(caller, name)
            deployment.set_readme(markdown)
            return await self.deployments.save(deployment)

        await self._visible(await retry_on_conflict(command))
        return await self.queries.readme(caller, name)

    async def activate(self, name: str) -> bool:
        """Wakes a deployment scaled to zero (a request waits at the gateway)."""

        async def command() -> list[StoredEvent]:
            deployment = await self.deployments.load(name)
            if not deployment.live or deployment.stopped or deployment.replicas > 0:
                return []
            deployment.autoscale(max(deployment.min_replicas, 1), "activation")
            return await self.deployments.save(deployment)

        events = await retry_on_conflict(command)
        await self._visible(events)
        return bool(events)

    async def _release(self, token: str, group: str, name: str, what: str) -> None:
        try:
            await self.peers.release(token, group, name)
        except Unavailable as exc:
            raise Unavailable(
                f"deployment {name!r} is {what}, but releasing its quota failed ({exc}); "
                f"run the command again to release it"
            ) from None

    async def _visible(self, events: list[StoredEvent]) -> None:
        if events and self.projection_wait_seconds > 0:
            await wait_until_projected(
                self.pool, SCHEMA, DeploymentsProjection.name, events, self.projection_wait_seconds
            )

    async def _answer(
        self, caller: Principal, name: str, events: list[StoredEvent]
    ) -> DeploymentView:
        await self._visible(events)
        return await self.queries.get(caller, name)
