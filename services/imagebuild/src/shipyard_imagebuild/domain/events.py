"""Imagebuild's events (see docs/events.md): version 1 each, but ``ImageVersionCreated``,
version 2 since cluster builds (decision 0029), with an upcaster from version 1."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from shipyard_core.aggregate import DomainEvent, EventRegistry
from shipyard_core.eventstore import Upcasters

ImageKind = Literal["pack", "oci"]
"""What an image version is: an environment pack in the object store (``pack``, built
locally) or an OCI image in a registry (``oci``, built by a Kaniko Job on a cluster)."""


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
    """A new version of an image exists.

    Version 2 added ``kind`` and ``image_ref``; a version 1 event is a pack (the upcaster
    below says so explicitly). For an ``oci`` image ``digest`` is the sha256 (hex) of the
    image manifest, ``image_ref`` the pushed image pinned by it
    (``registry/repo/group/name@sha256:<hex>``), ``pack_key`` empty and ``size_bytes`` 0
    (the registry knows the size; the build does not)."""

    schema_version: ClassVar[int] = 2

    version: int
    build_id: str
    digest: str
    """sha256 (hex) of the pack, or of the OCI image manifest."""
    size_bytes: int
    pack_key: str
    """Object store key of the pack (empty for an OCI image)."""
    python: str
    packages: list[tuple[str, str]]
    script: str
    workers: int
    source_digest: str
    source_name: str
    cache_key: str
    created_by: str
    readme: str
    kind: ImageKind = "pack"
    """``pack`` or ``oci`` (version 2)."""
    image_ref: str = ""
    """The OCI image, pinned by digest; empty for a pack (version 2)."""


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


IMAGEBUILD_UPCASTERS = Upcasters()
"""Upcasters of imagebuild's stored events, used by its event store and its projections."""


@IMAGEBUILD_UPCASTERS.register("ImageVersionCreated", 1)
def _image_version_created_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 1 knew only packs: kind ``pack``, no image reference."""
    return {**payload, "kind": "pack", "image_ref": ""}
