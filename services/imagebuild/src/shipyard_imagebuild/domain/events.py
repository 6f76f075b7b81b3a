"""Imagebuild's events (version 1 each; see docs/events.md)."""

from __future__ import annotations

from shipyard_core.aggregate import DomainEvent, EventRegistry


class BuildQueued(DomainEvent):
    """A model folder was uploaded and its build requested."""

    build_id: str
    group: str
    name: str
    source_digest: str
    source_key: str
    source_name: str
    python: str
    install_dependencies: bool
    cache_key: str
    requested_by: str


class BuildStarted(DomainEvent):
    """A builder took the build (attempt 2+ means an earlier builder died mid-build)."""

    attempt: int


class BuildSucceeded(DomainEvent):
    """The build made (or, from the cache, found) an image version."""

    version: int
    digest: str
    size_bytes: int
    cache_hit: bool
    seconds: float


class BuildFailed(DomainEvent):
    """The build failed; ``reason`` says why and how to fix it."""

    reason: str
    stage: str
    log_tail: str


class ImageVersionCreated(DomainEvent):
    """A new version of an image exists."""

    version: int
    build_id: str
    digest: str
    size_bytes: int
    pack_key: str
    python: str
    packages: list[tuple[str, str]]
    script: str
    workers: int
    source_digest: str
    source_name: str
    cache_key: str
    created_by: str
    readme: str


class ImageReadmeSet(DomainEvent):
    """A version's readme (GitHub-flavoured Markdown) was edited."""

    version: int
    markdown: str


class ImageVersionDeleted(DomainEvent):
    """A version was deleted; its number is never reused."""

    version: int


IMAGEBUILD_EVENTS = EventRegistry(
    BuildQueued,
    BuildStarted,
    BuildSucceeded,
    BuildFailed,
    ImageVersionCreated,
    ImageReadmeSet,
    ImageVersionDeleted,
)
