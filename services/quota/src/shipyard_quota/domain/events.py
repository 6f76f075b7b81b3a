"""Quota's events (version 1 each; see docs/events.md)."""

from __future__ import annotations

from shipyard_core.aggregate import DomainEvent, EventRegistry


class InstanceTypeDefined(DomainEvent):
    """An instance type was created or changed. Existing reservations keep their amounts."""

    name: str
    cpu_millis: int
    memory_mib: int
    gpu: int
    description: str = ""


class GroupQuotaSet(DomainEvent):
    """A group's limits were set. Lowering them below usage refuses new reservations only."""

    group: str
    cpu_millis: int
    memory_mib: int
    gpu: int
    instances: int


class ResourcesReserved(DomainEvent):
    """Resources were reserved for a deployment, or an existing reservation resized."""

    reservation_id: str
    deployment: str
    instance_type: str
    instances: int
    cpu_millis: int
    memory_mib: int
    gpu: int


class ReservationReleased(DomainEvent):
    """A reservation was given back."""

    reservation_id: str


QUOTA_EVENTS = EventRegistry(
    InstanceTypeDefined, GroupQuotaSet, ResourcesReserved, ReservationReleased
)
