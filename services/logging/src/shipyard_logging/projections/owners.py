"""Which group owns which revisions of a deployment, from the scheduler's events.

A deployment name may be deleted and created again, by another group: each
``DeploymentCreated`` starts a new *life* at its ``revision`` (documented in
docs/events.md; the logging service reads only the payload fields ``group`` and
``revision``, not the scheduler's code). A log line carries its revision, so it belongs
to the life whose first revision is the greatest one not above it, and only members of
that life's group (and admins) read it. A replay reads the scheduler's event store
(schema ``scheduler``) in the same database.
"""

from __future__ import annotations

from collections.abc import Iterable

from shipyard_core.eventstore import StoredEvent
from shipyard_core.projections import Projection, Statement

SCHEMA = "logging"
"""The logging service's schema (and service name)."""

SCHEDULER_SCHEMA = "scheduler"
"""Where deployment events come from."""


class DeploymentLivesProjection(Projection):
    """One row per life of a deployment name: its first revision and its group."""

    name = "deployment_lives"
    schema = SCHEMA
    sources = ((SCHEDULER_SCHEMA, "deployment"),)
    tables = {
        "deployment_lives": (
            "name text NOT NULL, first_revision int NOT NULL, group_name text NOT NULL, "
            "created_at timestamptz NOT NULL, PRIMARY KEY (name, first_revision)"
        ),
    }

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        """A ``DeploymentCreated`` starts a life; nothing else changes the owner."""
        if event.event_type == "DeploymentCreated":
            yield Statement(
                "INSERT INTO {deployment_lives} (name, first_revision, group_name, created_at) "
                "VALUES ($1, $2, $3, $4)",
                (
                    event.aggregate_id,
                    int(event.payload["revision"]),
                    str(event.payload["group"]),
                    event.recorded_at,
                ),
            )
