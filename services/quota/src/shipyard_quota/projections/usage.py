"""The usage projection: instance types, group limits and reservations, for queries."""

from __future__ import annotations

from collections.abc import Iterable

from shipyard_core.eventstore import StoredEvent
from shipyard_core.projections import Projection, Statement

SERVICE = "quota"


class UsageProjection(Projection):
    """Rows for ``ListInstanceTypes``, ``GetGroupUsage`` and ``ListGroupUsage``.

    Usage is summed from ``reservations`` at query time: a group has few reservations,
    and a sum can never disagree with its parts."""

    name = "usage"
    schema = SERVICE
    sources = ((SERVICE, "instance_type"), (SERVICE, "group"))
    tables = {
        "instance_types": (
            "name text PRIMARY KEY, cpu_millis bigint NOT NULL, memory_mib bigint NOT NULL, "
            "gpu int NOT NULL, description text NOT NULL, updated_at timestamptz NOT NULL"
        ),
        "group_quotas": (
            "group_name text PRIMARY KEY, cpu_millis bigint, memory_mib bigint, gpu int, "
            "instances int, updated_at timestamptz NOT NULL"
        ),
        "reservations": (
            "group_name text NOT NULL, reservation_id text NOT NULL, deployment text NOT NULL, "
            "instance_type text NOT NULL, instances int NOT NULL, cpu_millis bigint NOT NULL, "
            "memory_mib bigint NOT NULL, gpu int NOT NULL, reserved_at timestamptz NOT NULL, "
            "PRIMARY KEY (group_name, reservation_id)"
        ),
    }

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        p, at = event.payload, event.recorded_at
        group = event.aggregate_id
        if event.event_type == "InstanceTypeDefined":
            yield Statement(
                "INSERT INTO {instance_types} AS t VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (name) DO UPDATE SET cpu_millis = EXCLUDED.cpu_millis, "
                "memory_mib = EXCLUDED.memory_mib, gpu = EXCLUDED.gpu, "
                "description = EXCLUDED.description, updated_at = EXCLUDED.updated_at",
                (p["name"], p["cpu_millis"], p["memory_mib"], p["gpu"], p["description"], at),
            )
        elif event.event_type == "GroupQuotaSet":
            yield Statement(
                "INSERT INTO {group_quotas} VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (group_name) DO UPDATE SET cpu_millis = EXCLUDED.cpu_millis, "
                "memory_mib = EXCLUDED.memory_mib, gpu = EXCLUDED.gpu, "
                "instances = EXCLUDED.instances, updated_at = EXCLUDED.updated_at",
                (group, p["cpu_millis"], p["memory_mib"], p["gpu"], p["instances"], at),
            )
        elif event.event_type == "ResourcesReserved":
            yield Statement(
                "INSERT INTO {reservations} VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                "ON CONFLICT (group_name, reservation_id) DO UPDATE SET "
                "deployment = EXCLUDED.deployment, instance_type = EXCLUDED.instance_type, "
                "instances = EXCLUDED.instances, cpu_millis = EXCLUDED.cpu_millis, "
                "memory_mib = EXCLUDED.memory_mib, gpu = EXCLUDED.gpu, "
                "reserved_at = EXCLUDED.reserved_at",
                (
                    group,
                    p["reservation_id"],
                    p["deployment"],
                    p["instance_type"],
                    p["instances"],
                    p["cpu_millis"],
                    p["memory_mib"],
                    p["gpu"],
                    at,
                ),
            )
            yield _touch(group, at)
        elif event.event_type == "ReservationReleased":
            yield Statement(
                "DELETE FROM {reservations} WHERE group_name = $1 AND reservation_id = $2",
                (group, p["reservation_id"]),
            )
            yield _touch(group, at)


def _touch(group: str, at: object) -> Statement:
    # Keeps "last updated" of the group current; a group without limits still gets a row.
    return Statement(
        "INSERT INTO {group_quotas} (group_name, updated_at) VALUES ($1, $2) "
        "ON CONFLICT (group_name) DO UPDATE SET updated_at = EXCLUDED.updated_at",
        (group, at),
    )
