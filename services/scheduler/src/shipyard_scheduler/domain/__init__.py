"""The scheduler's domain: deployments and instances, and their events."""

from shipyard_scheduler.domain.aggregates import Deployment, Instance, InstanceState, Status
from shipyard_scheduler.domain.events import (
    SCHEDULER_EVENTS,
    SCHEDULER_UPCASTERS,
    ImageKind,
    Spec,
)

__all__ = [
    "SCHEDULER_EVENTS",
    "SCHEDULER_UPCASTERS",
    "Deployment",
    "ImageKind",
    "Instance",
    "InstanceState",
    "Spec",
    "Status",
]
