"""What the scheduler's queries answer: plain data, converted to protobuf by the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class DeploymentView:
    """One deployment as ``GetDeployment`` shows it."""

    name: str
    group: str
    status: str
    message: str
    revision: int
    active_revision: int
    spec: dict[str, Any]
    replicas: int
    ready_replicas: int
    min_replicas: int
    max_replicas: int
    target_inflight: int
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime
    endpoint: str


@dataclass(frozen=True)
class HistoryView:
    """One history row: a revision or an action."""

    revision: int
    action: str
    actor: str
    at: datetime
    stopped: bool
    spec: dict[str, Any]
    group: str
    replicas: int
    message: str


@dataclass(frozen=True)
class InstanceView:
    """One instance of a deployment."""

    instance_id: str
    deployment: str
    revision: int
    status: str
    address: str
    restarts: int
    message: str
    backend: str
    created_at: datetime
    ready_at: datetime | None
    ended_at: datetime | None


@dataclass(frozen=True)
class ReadmeView:
    """A deployment's readme."""

    name: str
    markdown: str
    updated_by: str
    updated_at: datetime | None


@dataclass(frozen=True)
class RouteView:
    """One deployment's routes for the gateway."""

    deployment: str
    group: str = ""
    access: str = "private"
    revision: int = 0
    addresses: list[str] = field(default_factory=list)
    scaled_to_zero: bool = False
    stopped: bool = False
    removed: bool = False
