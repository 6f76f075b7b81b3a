"""What imagebuild's queries and commands return (transport-neutral)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class BuildView:
    """A build as users see it."""

    build_id: str
    group: str
    name: str
    state: str
    version: int = 0
    cache_hit: bool = False
    reason: str = ""
    log_tail: str = ""
    requested_by: str = ""
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    source_digest: str = ""

    @property
    def image(self) -> str:
        """``name:version`` once succeeded."""
        return f"{self.name}:{self.version}" if self.version else ""


@dataclass(frozen=True)
class ImageView:
    """One image version."""

    group: str
    name: str
    version: int
    digest: str
    size_bytes: int
    python: str
    packages: list[tuple[str, str]] = field(default_factory=list)
    created_by: str = ""
    created_at: datetime | None = None
    source: str = ""
    build_id: str = ""
    script: str = ""
    workers: int = 1
    pack_key: str = ""
    readme: str = ""
    readme_updated_at: datetime | None = None
    readme_updated_by: str = ""
    kind: str = "pack"
    """``pack`` (an environment pack at ``pack_key``) or ``oci`` (an image at ``image_ref``)."""
    image_ref: str = ""
    """The OCI image pinned by digest (``registry/repo@sha256:<hex>``); empty for packs."""

    @property
    def ref(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"
