"""The scheduler's settings (env prefix ``SHIPYARD_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from shipyard_core.settings import CommonSettings


class SchedulerSettings(CommonSettings):
    """Settings of the scheduler service."""

    service_name: str = "scheduler"
    """The name in logs, traces and the NATS connection."""

    grpc_port: int = 50054
    """Port of the SchedulerService gRPC API."""

    quota_addr: str = "127.0.0.1:50052"
    """``host:port`` of the quota service (every create, start, update and scale-up
    reserves there first)."""

    imagebuild_addr: str = "127.0.0.1:50053"
    """``host:port`` of the imagebuild service (resolves ``name:version`` to a pack, or
    to an OCI image built on a cluster)."""

    gateway_url: str = "http://127.0.0.1:8080"
    """The gateway's public URL, shown as each deployment's endpoint."""

    runtime_backend: Literal["local", "kubernetes"] = "local"
    """Where instances run: ``local`` processes on this machine (environment packs only:
    deployments of OCI images are refused), or ``kubernetes`` pods (packs and OCI
    images)."""

    object_store: str = ""
    """Where image packs are stored (as imagebuild's setting). Empty:
    ``file://<data_dir>/objects``."""

    runtime_dir: Path | None = None
    """Local backend: unpacked images, instance state and logs. Empty:
    ``<data_dir>/runtime``."""

    instance_host: str = "127.0.0.1"
    """Local backend: the address model servers bind to and the gateway connects to."""

    prefetch_images: bool = True
    """Local backend: fetch, unpack and byte-compile every new image as soon as it is
    built, so its first deployment starts without waiting for that (costs the unpacked
    image's disk space for images never deployed)."""

    image_cache_keep: int = Field(default=8, ge=0)
    """Local backend with prefetch: unpacked images that no instance uses are deleted
    beyond this many (the most recently used are kept)."""

    ship_logs: bool = True
    """Local backend: send every instance's output to the ``LOGS`` stream, where the
    logging service collects it (``shipyard deploy logs``)."""

    reconcile_interval_seconds: float = Field(default=0.5, gt=0)
    """How often the reconciler compares desired and actual state (it also wakes on
    every change to a deployment)."""

    max_restarts: int = Field(default=3, ge=1)
    """An instance of the newest revision restarted this many times without becoming
    ready fails the revision (the reason and the last log lines are kept)."""

    restart_backoff_seconds: float = Field(default=1.0, gt=0)
    """First delay before restarting a crashed instance; doubles up to 30 s."""

    drain_seconds: float = Field(default=2.0, ge=0)
    """After traffic moves to a new revision, how long the old instances keep running so
    that requests routed before the switch finish."""

    grace_seconds: float = Field(default=10.0, ge=0)
    """How long a stopping instance gets after SIGTERM before it is killed."""

    default_target_inflight: int = Field(default=4, ge=1)
    """Autoscaling target (in-flight requests per instance) when a deployment gives none."""

    scale_down_delay_seconds: float = Field(default=30.0, ge=0)
    """The autoscaler scales down only after the load was lower for this long."""

    scale_to_zero_after_seconds: float = Field(default=300.0, ge=0)
    """A deployment with min 0 and no request for this long scales to zero."""

    load_report_max_age_seconds: float = Field(default=5.0, gt=0)
    """Gateway load reports older than this are ignored (that gateway is gone)."""

    projection_wait_seconds: float = 5.0
    """How long a command waits for its effect to show in queries before answering."""

    k8s_namespace: str = "shipyard-models"
    """Kubernetes backend: the namespace of the model Deployments and Services."""

    k8s_service_image: str = "ghcr.io/shipyard/shipyard:latest"
    """Kubernetes backend: the Shipyard image (its init container fetches the pack; pods
    of OCI images have none)."""

    k8s_runtime_image: str = "python:3.11-slim"
    """Kubernetes backend: the base image the environment pack runs in (same Python as
    the image builder)."""

    k8s_image_pull_secret: str = ""
    """Kubernetes backend: the image pull secret of model pods (empty: none); also the
    login to the registry that cluster builds push OCI images to."""

    k8s_store_secret: str = "shipyard-object-store"  # noqa: S105 - a Secret's name
    """Kubernetes backend: a Secret with the object store's environment (S3 endpoint and
    credentials) for the init container (empty: none)."""

    def store_url(self) -> str:
        """The object store URL with its default applied."""
        return self.object_store or f"file://{self.data_dir / 'objects'}"

    def runtime_path(self) -> Path:
        """The local runtime directory with its default applied."""
        return self.runtime_dir or self.data_dir / "runtime"
