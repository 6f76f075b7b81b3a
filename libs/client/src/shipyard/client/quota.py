"""The quota service: instance types, group quotas, usage and reservations."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from shipyard.client._channel import Transport
from shipyard.client._convert import PlainData, to_datetime
from shipyard.quota.v1 import quota_pb2 as pb
from shipyard.quota.v1 import quota_pb2_grpc as pb_grpc

SERVICE = "quota"


@dataclass(frozen=True)
class InstanceType(PlainData):
    """A named machine shape deployments pick (``cpu.small``: 1 core, 2 GiB)."""

    name: str
    cpu: float
    memory_gib: float
    gpu: int = 0
    description: str = ""

    @classmethod
    def from_proto(cls, msg: pb.InstanceType) -> InstanceType:
        """Builds it from the protobuf message."""
        return cls(
            name=msg.name,
            cpu=msg.cpu,
            memory_gib=msg.memory_gib,
            gpu=msg.gpu,
            description=msg.description,
        )


@dataclass(frozen=True)
class Resources(PlainData):
    """An amount of resources (also used for limits)."""

    cpu: float = 0.0
    memory_gib: float = 0.0
    gpu: int = 0
    instances: int = 0

    @classmethod
    def from_proto(cls, msg: pb.Resources) -> Resources:
        """Builds it from the protobuf message."""
        return cls(cpu=msg.cpu, memory_gib=msg.memory_gib, gpu=msg.gpu, instances=msg.instances)

    def to_proto(self) -> pb.Resources:
        """The protobuf message."""
        return pb.Resources(
            cpu=self.cpu, memory_gib=self.memory_gib, gpu=self.gpu, instances=self.instances
        )


@dataclass(frozen=True)
class Reservation(PlainData):
    """Resources held for one deployment in one group."""

    reservation_id: str
    group: str
    deployment: str
    instance_type: str
    instances: int
    resources: Resources
    reserved_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: pb.Reservation) -> Reservation:
        """Builds it from the protobuf message."""
        return cls(
            reservation_id=msg.reservation_id,
            group=msg.group,
            deployment=msg.deployment,
            instance_type=msg.instance_type,
            instances=msg.instances,
            resources=Resources.from_proto(msg.resources),
            reserved_at=to_datetime(msg.reserved_at),
        )


@dataclass(frozen=True)
class GroupUsage(PlainData):
    """A group's quota (``limits``), what its deployments hold (``used``) and what is left."""

    group: str
    limits: Resources
    used: Resources
    free: Resources
    reservations: list[Reservation] = field(default_factory=list)
    updated_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: pb.GroupUsage) -> GroupUsage:
        """Builds it from the protobuf message."""
        return cls(
            group=msg.group,
            limits=Resources.from_proto(msg.limits),
            used=Resources.from_proto(msg.used),
            free=Resources.from_proto(msg.free),
            reservations=[Reservation.from_proto(r) for r in msg.reservations],
            updated_at=to_datetime(msg.updated_at),
        )


class QuotaClient:
    """Typed calls to the quota service. Obtain it as ``Client().quota``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _stub(self) -> pb_grpc.QuotaServiceStub:
        return self._transport.stub(SERVICE, pb_grpc.QuotaServiceStub)

    def set_instance_type(
        self,
        name: str,
        *,
        cpu: float,
        memory_gib: float,
        gpu: int = 0,
        description: str = "",
    ) -> InstanceType:
        """Creates or replaces an instance type (admin only)."""
        request = pb.SetInstanceTypeRequest(
            instance_type=pb.InstanceType(
                name=name, cpu=cpu, memory_gib=memory_gib, gpu=gpu, description=description
            )
        )
        reply: pb.InstanceType = self._transport.call(
            SERVICE, "SetInstanceType", self._stub().SetInstanceType, request
        )
        return InstanceType.from_proto(reply)

    def list_instance_types(self) -> list[InstanceType]:
        """The instance-type catalog."""
        reply: pb.ListInstanceTypesResponse = self._transport.call(
            SERVICE,
            "ListInstanceTypes",
            self._stub().ListInstanceTypes,
            pb.ListInstanceTypesRequest(),
        )
        return [InstanceType.from_proto(t) for t in reply.instance_types]

    def set_group_quota(
        self,
        group: str,
        *,
        cpu: float,
        memory_gib: float,
        gpu: int = 0,
        instances: int,
    ) -> GroupUsage:
        """Sets (replaces) a group's quota (admin only); returns the group's usage under it."""
        request = pb.SetGroupQuotaRequest(
            group=group,
            limits=pb.Resources(cpu=cpu, memory_gib=memory_gib, gpu=gpu, instances=instances),
        )
        reply: pb.GroupUsage = self._transport.call(
            SERVICE, "SetGroupQuota", self._stub().SetGroupQuota, request
        )
        return GroupUsage.from_proto(reply)

    def usage(self, group: str) -> GroupUsage:
        """One group's limits, usage, free resources and reservations."""
        reply: pb.GroupUsage = self._transport.call(
            SERVICE,
            "GetGroupUsage",
            self._stub().GetGroupUsage,
            pb.GetGroupUsageRequest(group=group),
        )
        return GroupUsage.from_proto(reply)

    def list_usage(self) -> list[GroupUsage]:
        """Usage of every group the caller may see (all groups for admins)."""
        reply: pb.ListGroupUsageResponse = self._transport.call(
            SERVICE,
            "ListGroupUsage",
            self._stub().ListGroupUsage,
            pb.ListGroupUsageRequest(),
        )
        return [GroupUsage.from_proto(g) for g in reply.groups]

    def reserve(
        self,
        group: str,
        *,
        reservation_id: str,
        deployment: str,
        instance_type: str,
        instances: int,
    ) -> Reservation:
        """Reserves resources for a deployment; idempotent by ``reservation_id`` (repeating
        it with other amounts resizes the reservation). Raises
        :class:`~shipyard.client.errors.QuotaExceeded` when the group has too little free."""
        request = pb.ReserveRequest(
            group=group,
            reservation_id=reservation_id,
            deployment=deployment,
            instance_type=instance_type,
            instances=instances,
        )
        reply: pb.Reservation = self._transport.call(
            SERVICE, "Reserve", self._stub().Reserve, request
        )
        return Reservation.from_proto(reply)

    def release(self, group: str, reservation_id: str) -> bool:
        """Releases a reservation; ``False`` when there was nothing to release."""
        reply: pb.ReleaseResponse = self._transport.call(
            SERVICE,
            "Release",
            self._stub().Release,
            pb.ReleaseRequest(group=group, reservation_id=reservation_id),
        )
        return reply.released
