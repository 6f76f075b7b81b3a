"""The quota aggregates: an instance type, and a group's quota with its reservations.

All reservations of a group live in the group's stream, so every decision to reserve
is taken on the group's exact current state and saved with its version: two racing
reservations cannot both take the last free CPU (the loser retries on fresh state)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shipyard_core.aggregate import Aggregate, DomainEvent
from shipyard_core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from shipyard_quota.domain.amount import Amount
from shipyard_quota.domain.events import (
    GroupQuotaSet,
    InstanceTypeDefined,
    ReservationReleased,
    ResourcesReserved,
)


class InstanceType(Aggregate):
    """One entry of the instance-type catalog."""

    aggregate_type = "instance_type"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.unit = Amount()
        self.description = ""

    def define(self, unit: Amount, description: str) -> None:
        """Creates or changes the type; a no-op when nothing changes."""
        if unit.instances != 1:
            raise InvalidArgument("instance_type", "an instance type is one instance")
        if self.exists and unit == self.unit and description == self.description:
            return
        self.emit(
            InstanceTypeDefined(
                name=self.id,
                cpu_millis=unit.cpu_millis,
                memory_mib=unit.memory_mib,
                gpu=unit.gpu,
                description=description,
            )
        )

    def apply(self, event: DomainEvent) -> None:
        if isinstance(event, InstanceTypeDefined):
            self.unit = Amount(event.cpu_millis, event.memory_mib, event.gpu, 1)
            self.description = event.description


@dataclass(frozen=True)
class Reservation:
    """Resources held for one deployment."""

    reservation_id: str
    group: str
    deployment: str
    instance_type: str
    instances: int
    amount: Amount
    reserved_at: datetime | None = None


class GroupQuota(Aggregate):
    """A group's limits and the reservations against them."""

    aggregate_type = "group"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.limits: Amount | None = None
        self.reservations: dict[str, Reservation] = {}

    @property
    def used(self) -> Amount:
        """The sum of all reservations."""
        total = Amount()
        for r in self.reservations.values():
            total = total + r.amount
        return total

    def set_limits(self, limits: Amount) -> None:
        """Sets the quota (a no-op when unchanged)."""
        if limits == self.limits:
            return
        self.emit(
            GroupQuotaSet(
                group=self.id,
                cpu_millis=limits.cpu_millis,
                memory_mib=limits.memory_mib,
                gpu=limits.gpu,
                instances=limits.instances,
            )
        )

    def reserve(
        self,
        reservation_id: str,
        deployment: str,
        instance_type: str,
        unit: Amount,
        instances: int,
    ) -> Reservation:
        """Reserves ``instances`` of ``unit``, or resizes the reservation with this id.

        Idempotent: the same request again changes nothing. A refusal names every
        dimension that does not fit, with what was asked and what is free."""
        if self.limits is None:
            raise FailedPrecondition(
                f"group {self.id} has no quota yet; an admin sets one with "
                f"`shipyard quota set {self.id} --cpu N --memory GIB --gpu N --instances N`"
            )
        need = unit.times(instances)
        existing = self.reservations.get(reservation_id)
        if existing is not None:
            if existing.deployment != deployment:
                raise FailedPrecondition(
                    f"reservation {reservation_id} belongs to deployment {existing.deployment}, "
                    f"not {deployment}; use another reservation id"
                )
            if (existing.instance_type, existing.instances, existing.amount) == (
                instance_type,
                instances,
                need,
            ):
                return existing
        free = self.limits - (self.used - (existing.amount if existing else Amount()))
        # Only growth needs room: shrinking a reservation always fits.
        growth = need - (existing.amount if existing else Amount())
        short = need.shortfalls(free, growing=growth)
        if short:
            asked = ", ".join(n for n, _ in short)
            available = ", ".join(f for _, f in short)
            sep = "; " if len(short) > 1 else ", "
            raise ResourceExhausted(
                f"group {self.id} needs {asked}{sep}{available} free "
                f"(quota: {self.limits.describe()}; used: {self.used.describe()})"
            )
        self.emit(
            ResourcesReserved(
                reservation_id=reservation_id,
                deployment=deployment,
                instance_type=instance_type,
                instances=instances,
                cpu_millis=need.cpu_millis,
                memory_mib=need.memory_mib,
                gpu=need.gpu,
            )
        )
        return self.reservations[reservation_id]

    def release(self, reservation_id: str) -> bool:
        """Gives a reservation back; False (and no event) when there is none."""
        if reservation_id not in self.reservations:
            return False
        self.emit(ReservationReleased(reservation_id=reservation_id))
        return True

    def apply(self, event: DomainEvent) -> None:
        if isinstance(event, GroupQuotaSet):
            self.limits = Amount(event.cpu_millis, event.memory_mib, event.gpu, event.instances)
        elif isinstance(event, ResourcesReserved):
            self.reservations[event.reservation_id] = Reservation(
                reservation_id=event.reservation_id,
                group=self.id,
                deployment=event.deployment,
                instance_type=event.instance_type,
                instances=event.instances,
                amount=Amount(event.cpu_millis, event.memory_mib, event.gpu, event.instances),
            )
        elif isinstance(event, ReservationReleased):
            self.reservations.pop(event.reservation_id, None)
