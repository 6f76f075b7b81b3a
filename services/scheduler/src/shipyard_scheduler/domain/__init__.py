"""The scheduler's domain: deployments and instances, and their events."""

from shipyard_scheduler.domain.aggregates import Deployment, Instance, InstanceState, Status
from shipyard_scheduler.domain.events import (
    IMAGE_KINDS,
    SCHEDULER_EVENTS,
    SCHEDULER_UPCASTERS,
    ImageKind,
    Spec,
)

__all__ = [
    "IMAGE_KINDS",
    "SCHEDULER_EVENTS",
    "SCHEDULER_UPCASTERS",
    "Deployment",
    "ImageKind",
    "Instance",
    "InstanceState",
    "Spec",
    "Status",
]
