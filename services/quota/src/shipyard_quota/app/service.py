"""Quota's use cases. Each takes the caller's principal, checks permission, validates,
and either decides on an aggregate (commands) or reads the usage projection (queries)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

import asyncpg

from shipyard_core import validation
from shipyard_core.aggregate import Repository, retry_on_conflict
from shipyard_core.auth import Principal
from shipyard_core.errors import InvalidArgument, NotFound
from shipyard_core.eventstore import EventStore, StoredEvent
from shipyard_core.projections.consistency import wait_until_projected
from shipyard_quota.domain.aggregates import GroupQuota, InstanceType, Reservation
from shipyard_quota.domain.amount import Amount
from shipyard_quota.domain.events import QUOTA_EVENTS
from shipyard_quota.projections import UsageProjection

MAX_INSTANCES_PER_RESERVATION = 10_000


@dataclass(frozen=True)
class InstanceTypeView:
    """An instance type as queries return it."""

    name: str
    unit: Amount
    description: str


@dataclass
class GroupUsageView:
    """A group's limits, usage, what is free, and its reservations."""

    group: str
    limits: Amount | None
    used: Amount
    reservations: list[Reservation] = field(default_factory=list)
    updated_at: datetime | None = None

    @property
    def free(self) -> Amount:
        """Limits minus usage, never negative."""
        return ((self.limits or Amount()) - self.used).clamp()


class QuotaApp:
    """The quota service's handlers."""

    def __init__(
        self, store: EventStore, pool: asyncpg.Pool, *, projection_wait: float = 5.0
    ) -> None:
        self.store = store
        self.pool = pool
        # How long commands wait for their effect to be readable (0: don't wait).
        self.projection_wait = projection_wait
        self.groups = Repository(store, GroupQuota, QUOTA_EVENTS)
        self.instance_types = Repository(store, InstanceType, QUOTA_EVENTS)
        self.tables = UsageProjection.live_tables()

    # -- commands --------------------------------------------------------------------

    async def set_instance_type(
        self,
        caller: Principal,
        name: str,
        *,
        cpu: float,
        memory_gib: float,
        gpu: int,
        description: str = "",
    ) -> InstanceTypeView:
        """Creates or changes an instance type (admin only)."""
        caller.require_admin("defining instance types")
        validation.dotted_name("instance_type.name", name)
        unit = Amount.from_units(
            cpu=cpu, memory_gib=memory_gib, gpu=gpu, instances=1, field="instance_type"
        )
        if unit.cpu_millis == 0 or unit.memory_mib == 0:
            raise InvalidArgument(
                "instance_type", "needs some CPU and memory", "e.g. --cpu 1 --memory 2"
            )
        if len(description) > 500:
            raise InvalidArgument("instance_type.description", "is longer than 500 characters")

        async def command() -> InstanceTypeView:
            it = await self.instance_types.load(name)
            it.define(unit, description)
            events = await self.instance_types.save(it)
            await self._visible(events)
            return InstanceTypeView(name, it.unit, it.description)

        return await retry_on_conflict(command)

    async def set_group_quota(
        self, caller: Principal, group: str, limits: Amount
    ) -> GroupUsageView:
        """Sets a group's quota (admin only)."""
        caller.require_admin("setting quotas")
        validation.name("group", group)

        async def command() -> GroupUsageView:
            quota = await self.groups.load(group)
            quota.set_limits(limits)
            events = await self.groups.save(quota)
            await self._visible(events)
            # Answer from the aggregate: it is the truth, the projection may lag.
            return GroupUsageView(
                group,
                quota.limits,
                quota.used,
                list(quota.reservations.values()),
                events[-1].recorded_at if events else None,
            )

        return await retry_on_conflict(command)

    async def reserve(
        self,
        caller: Principal,
        group: str,
        reservation_id: str,
        deployment: str,
        instance_type: str,
        instances: int,
    ) -> Reservation:
        """Reserves resources for a deployment; idempotent by reservation id."""
        validation.name("group", group)
        caller.require_member(group)
        if not reservation_id or len(reservation_id) > 200:
            raise InvalidArgument("reservation_id", "must be 1-200 characters")
        validation.name("deployment", deployment)
        validation.dotted_name("instance_type", instance_type)
        validation.positive_int("instances", instances, maximum=MAX_INSTANCES_PER_RESERVATION)

        async def command() -> Reservation:
            it = await self.instance_types.load(instance_type)
            if not it.exists:
                raise NotFound(
                    f"instance type {instance_type} does not exist; "
                    "see `shipyard instance-types list`"
                )
            quota = await self.groups.load(group)
            reservation = quota.reserve(
                reservation_id, deployment, instance_type, it.unit, instances
            )
            stored = await self.groups.save(quota)
            if stored:
                reservation = replace(reservation, reserved_at=stored[-1].recorded_at)
                # Read-your-writes: usage shown right after (by `deploy create`) counts it.
                await self._visible(stored)
            return reservation

        return await retry_on_conflict(command)

    async def release(self, caller: Principal, group: str, reservation_id: str) -> bool:
        """Releases a reservation; False when there was nothing to release."""
        validation.name("group", group)
        caller.require_member(group)
        if not reservation_id:
            raise InvalidArgument("reservation_id", "is required")

        async def command() -> bool:
            quota = await self.groups.load(group)
            released = quota.release(reservation_id)
            await self._visible(await self.groups.save(quota))
            return released

        return await retry_on_conflict(command)

    async def _visible(self, events: list[StoredEvent]) -> None:
        if self.projection_wait > 0:
            await wait_until_projected(
                self.pool, "quota", UsageProjection.name, events, self.projection_wait
            )

    # -- queries ---------------------------------------------------------------------

    async def list_instance_types(self, caller: Principal) -> list[InstanceTypeView]:
        """The catalog, by name. Any authenticated caller."""
        rows = await self.pool.fetch(f"SELECT * FROM {self.tables['instance_types']} ORDER BY name")
        return [
            InstanceTypeView(
                r["name"], Amount(r["cpu_millis"], r["memory_mib"], r["gpu"], 1), r["description"]
            )
            for r in rows
        ]

    async def group_usage(self, caller: Principal, group: str) -> GroupUsageView:
        """One group's usage: admins and the group's members."""
        validation.name("group", group)
        caller.require_member(group)
        views = await self._usage([group])
        if not views:
            raise NotFound(
                f"group {group} has no quota; an admin sets one with "
                f"`shipyard quota set {group} --cpu N --memory GIB --gpu N --instances N`"
            )
        return views[0]

    async def list_group_usage(self, caller: Principal) -> list[GroupUsageView]:
        """Every group for admins; the caller's own groups otherwise."""
        return await self._usage(None if caller.admin else sorted(caller.groups))

    async def _usage(self, groups: list[str] | None) -> list[GroupUsageView]:
        t = self.tables
        where = "" if groups is None else "WHERE group_name = ANY($1::text[])"
        args = [] if groups is None else [groups]
        quotas = await self.pool.fetch(
            f"SELECT * FROM {t['group_quotas']} {where} ORDER BY group_name", *args
        )
        reservations = await self.pool.fetch(
            f"SELECT * FROM {t['reservations']} {where} ORDER BY group_name, reserved_at, "
            "reservation_id",
            *args,
        )
        views: dict[str, GroupUsageView] = {}
        for q in quotas:
            limits = None
            if q["cpu_millis"] is not None:
                limits = Amount(q["cpu_millis"], q["memory_mib"], q["gpu"], q["instances"])
            views[q["group_name"]] = GroupUsageView(
                q["group_name"], limits, Amount(), updated_at=q["updated_at"]
            )
        for r in reservations:
            view = views.get(r["group_name"])
            if view is None:
                continue
            amount = Amount(r["cpu_millis"], r["memory_mib"], r["gpu"], r["instances"])
            view.used = view.used + amount
            view.reservations.append(
                Reservation(
                    reservation_id=r["reservation_id"],
                    group=r["group_name"],
                    deployment=r["deployment"],
                    instance_type=r["instance_type"],
                    instances=r["instances"],
                    amount=amount,
                    reserved_at=r["reserved_at"],
                )
            )
        return list(views.values())
