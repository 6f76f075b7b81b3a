"""Which deployments use which image versions: fed by the scheduler's deployment events.

A deployment uses the image of every revision that may run: the newest, and the active
one until traffic moves on (``RevisionActivated`` retires the older rows). A stopped
deployment still uses its image (it keeps its definition); a deleted one does not."""

from __future__ import annotations

from collections.abc import Iterable

from shipyard_core.eventstore import StoredEvent
from shipyard_core.projections import Projection, Statement

SCHEMA = "imagebuild"


class UsageProjection(Projection):
    """Rows for ``GetImageUsage`` and the delete guard."""

    name = "usage"
    schema = SCHEMA
    sources = (("scheduler", "deployment"),)
    tables = {
        "image_usage": (
            "deployment text NOT NULL, revision int NOT NULL, group_name text NOT NULL, "
            "image_name text NOT NULL, image_version int NOT NULL, "
            "PRIMARY KEY (deployment, revision)"
        ),
    }
    indexes = (("image_usage", "group_name, image_name, image_version"),)

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        p, name = event.payload, event.aggregate_id
        t = event.event_type
        if t in ("DeploymentCreated", "DeploymentUpdated"):
            spec = p["spec"]
            if t == "DeploymentCreated":
                yield Statement("DELETE FROM {image_usage} WHERE deployment = $1", (name,))
                group = p["group"]
                yield Statement(
                    "INSERT INTO {image_usage} (deployment, revision, group_name, image_name, "
                    "image_version) VALUES ($1, $2, $3, $4, $5)",
                    (name, p["revision"], group, spec["image_name"], spec["image_version"]),
                )
            else:
                yield Statement(
                    "INSERT INTO {image_usage} (deployment, revision, group_name, image_name, "
                    "image_version) SELECT $1, $2, group_name, $3, $4 FROM {image_usage} "
                    "WHERE deployment = $1 ORDER BY revision DESC LIMIT 1",
                    (name, p["revision"], spec["image_name"], spec["image_version"]),
                )
        elif t == "RevisionActivated":
            yield Statement(
                "DELETE FROM {image_usage} WHERE deployment = $1 AND revision < $2",
                (name, p["revision"]),
            )
        elif t == "DeploymentDeleted":
            yield Statement("DELETE FROM {image_usage} WHERE deployment = $1", (name,))
