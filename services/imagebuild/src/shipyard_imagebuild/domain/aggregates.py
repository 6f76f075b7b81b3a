"""The Build aggregate (one build's life) and ImageRepo (one image name in a group: its
versions, readmes and deletions). A successful build saves both in one append, so a
version exists exactly when its build succeeded."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shipyard_core.aggregate import Aggregate, DomainEvent
from shipyard_core.errors import FailedPrecondition, NotFound
from shipyard_imagebuild.domain.events import (
    BuildFailed,
    BuildQueued,
    BuildStarted,
    BuildSucceeded,
    ImageReadmeSet,
    ImageVersionCreated,
    ImageVersionDeleted,
)


class BuildState(enum.StrEnum):
    """Where a build is."""

    NEW = "new"
    QUEUED = "queued"
    BUILDING = "building"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Build(Aggregate):
    """One build: queued → building → succeeded | failed."""

    aggregate_type = "build"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.state = BuildState.NEW
        self.request: BuildQueued | None = None
        self.attempts = 0
        # Not `version`: that is the aggregate's stream version (optimistic concurrency).
        self.image_version = 0

    @property
    def finished(self) -> bool:
        """Whether the build reached a final state."""
        return self.state in (BuildState.SUCCEEDED, BuildState.FAILED)

    def queue(self, request: BuildQueued) -> None:
        """Records the request (once)."""
        if self.state is not BuildState.NEW:
            raise FailedPrecondition(f"build {self.id} exists already")
        self.emit(request)

    def start(self) -> int:
        """A builder takes the build; returns the attempt number."""
        if self.finished:
            raise FailedPrecondition(f"build {self.id} is {self.state}, it cannot start again")
        self.emit(BuildStarted(attempt=self.attempts + 1))
        return self.attempts

    def succeed(
        self, version: int, digest: str, size_bytes: int, cache_hit: bool, seconds: float
    ) -> None:
        """The build made (or found) ``version``."""
        if self.finished:
            raise FailedPrecondition(f"build {self.id} is {self.state} already")
        self.emit(
            BuildSucceeded(
                version=version,
                digest=digest,
                size_bytes=size_bytes,
                cache_hit=cache_hit,
                seconds=round(seconds, 3),
            )
        )

    def fail(self, reason: str, stage: str, log_tail: str = "") -> None:
        """The build failed, for ``reason``."""
        if self.finished:
            return
        self.emit(BuildFailed(reason=reason, stage=stage, log_tail=log_tail[-4000:]))

    def apply(self, event: DomainEvent) -> None:
        if isinstance(event, BuildQueued):
            self.request = event
            self.state = BuildState.QUEUED
        elif isinstance(event, BuildStarted):
            self.attempts = event.attempt
            self.state = BuildState.BUILDING
        elif isinstance(event, BuildSucceeded):
            self.image_version = event.version
            self.state = BuildState.SUCCEEDED
        elif isinstance(event, BuildFailed):
            self.state = BuildState.FAILED


@dataclass
class ImageVersion:
    """What the catalog knows of one version."""

    created: ImageVersionCreated
    readme: str
    deleted: bool = False


class ImageRepo(Aggregate):
    """All versions of one image name in one group (id ``<group>/<name>``)."""

    aggregate_type = "image"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.versions: dict[int, ImageVersion] = {}

    @property
    def next_version(self) -> int:
        """Versions only grow; a deleted number is never given again."""
        return max(self.versions, default=0) + 1

    def live(self, version: int) -> ImageVersion:
        """A version that exists and is not deleted."""
        found = self.versions.get(version)
        if found is None or found.deleted:
            raise NotFound(f"image {self.name}:{version} does not exist; see `shipyard image list`")
        return found

    @property
    def name(self) -> str:
        """The image name (without the group)."""
        return self.id.split("/", 1)[1]

    def latest(self) -> int:
        """The newest version that is not deleted."""
        alive = [v for v, info in self.versions.items() if not info.deleted]
        if not alive:
            raise NotFound(
                f"image {self.name} has no versions; build one with `shipyard image build`"
            )
        return max(alive)

    def cached(self, cache_key: str) -> int | None:
        """The live version built from identical inputs, if any."""
        for number, info in sorted(self.versions.items(), reverse=True):
            if not info.deleted and info.created.cache_key == cache_key:
                return number
        return None

    def add_version(self, created: ImageVersionCreated) -> int:
        """Adds the next version (``created.version`` is overwritten with it)."""
        version = self.next_version
        self.emit(created.model_copy(update={"version": version}))
        return version

    def set_readme(self, version: int, markdown: str) -> None:
        """Replaces a version's readme."""
        self.live(version)
        self.emit(ImageReadmeSet(version=version, markdown=markdown))

    def delete(self, version: int) -> None:
        """Deletes a version (the caller checked that no deployment uses it)."""
        self.live(version)
        self.emit(ImageVersionDeleted(version=version))

    def apply(self, event: DomainEvent) -> None:
        if isinstance(event, ImageVersionCreated):
            self.versions[event.version] = ImageVersion(event, event.readme)
        elif isinstance(event, ImageReadmeSet):
            self.versions[event.version].readme = event.markdown
        elif isinstance(event, ImageVersionDeleted):
            self.versions[event.version].deleted = True
