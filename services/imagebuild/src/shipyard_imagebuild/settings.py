"""Imagebuild's settings (env prefix ``SHIPYARD_``)."""

from __future__ import annotations

from pathlib import Path

from shipyard_core.settings import CommonSettings


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

    def store_url(self) -> str:
        """The object store URL with its default applied."""
        return self.object_store or f"file://{self.data_dir / 'objects'}"

    def builds_path(self) -> Path:
        """The scratch directory with its default applied."""
        return self.build_dir or self.data_dir / "builds"

    def uv_cache_path(self) -> Path:
        """The uv cache directory with its default applied."""
        return self.uv_cache_dir or self.data_dir / "uv-cache"
