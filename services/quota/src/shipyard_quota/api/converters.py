"""Domain values ↔ protobuf messages."""

from __future__ import annotations

from shipyard.quota.v1 import quota_pb2
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_quota.app.service import GroupUsageView, InstanceTypeView
from shipyard_quota.domain.aggregates import Reservation
from shipyard_quota.domain.amount import Amount


def resources(amount: Amount) -> quota_pb2.Resources:
    """An amount in user units (cores, GiB)."""
    return quota_pb2.Resources(
        cpu=amount.cpu, memory_gib=amount.memory_gib, gpu=amount.gpu, instances=amount.instances
    )


def amount(res: quota_pb2.Resources, field: str) -> Amount:
    """User units to the domain's integer units, validated (errors name ``field``)."""
    return Amount.from_units(
        cpu=res.cpu, memory_gib=res.memory_gib, gpu=res.gpu, instances=res.instances, field=field
    )


def instance_type(view: InstanceTypeView) -> quota_pb2.InstanceType:
    """An instance type."""
    return quota_pb2.InstanceType(
        name=view.name,
        cpu=view.unit.cpu,
        memory_gib=view.unit.memory_gib,
        gpu=view.unit.gpu,
        description=view.description,
    )


def reservation(r: Reservation) -> quota_pb2.Reservation:
    """A reservation."""
    return quota_pb2.Reservation(
        reservation_id=r.reservation_id,
        group=r.group,
        deployment=r.deployment,
        instance_type=r.instance_type,
        instances=r.instances,
        resources=resources(r.amount),
        reserved_at=to_timestamp(r.reserved_at),
    )


def group_usage(view: GroupUsageView) -> quota_pb2.GroupUsage:
    """A group's usage."""
    return quota_pb2.GroupUsage(
        group=view.group,
        limits=resources(view.limits or Amount()),
        used=resources(view.used),
        free=resources(view.free),
        reservations=[reservation(r) for r in view.reservations],
        updated_at=to_timestamp(view.updated_at),
    )
