"""Read models of deployment client keys: the keys themselves, and who owns each
deployment now (followed from the scheduler's events).

``VerifyClientKey`` reads both in one indexed lookup (by the SHA-256 of the secret, joined
with the deployment's owner), so the gateway's check costs one round trip. Handlers are
pure (only the event; times are the envelope's ``recorded_at``), so a replay rebuilds
identical tables.
"""

from __future__ import annotations

from collections.abc import Iterable

from shipyard_core.eventstore import StoredEvent
from shipyard_core.projections import Projection, Statement
from shipyard_keys.domain.events import REGISTRY, ClientKeyCreated, ClientKeyRevoked
from shipyard_keys.projections.identity import SCHEMA

SCHEDULER_SCHEMA = "scheduler"
"""The scheduler's schema (and service name): where deployment events come from."""


class ClientKeysProjection(Projection):
    """Every client key (revoked ones too), by the hash of its secret."""

    name = "client_keys"
    schema = SCHEMA
    sources = ((SCHEMA, "client_keys"),)
    tables = {
        # Keyed by the SHA-256 of the secret: the gateway's check is one index lookup.
        # created_version orders a deployment's keys (and tells its current owner: the
        # group of the newest key) without relying on clocks.
        "client_keys": (
            "key_hash text PRIMARY KEY, deployment text NOT NULL, key_id text NOT NULL, "
            "group_name text NOT NULL, client text NOT NULL, "
            "created_at timestamptz NOT NULL, created_by text NOT NULL, "
            "created_version bigint NOT NULL, revoked_at timestamptz, revoked_by text"
        ),
    }
    indexes = (("client_keys", "deployment, key_id"),)

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        """The writes one client key event causes (plain INSERT/UPDATE: the runner applies
        each event once, in stream order)."""
        ev = REGISTRY.decode(event)
        if isinstance(ev, ClientKeyCreated):
            yield Statement(
                "INSERT INTO {client_keys} (key_hash, deployment, key_id, group_name, client, "
                "created_at, created_by, created_version) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                (
                    ev.key_hash,
                    ev.deployment,
                    ev.key_id,
                    ev.group,
                    ev.client,
                    event.recorded_at,
                    ev.created_by,
                    event.version,
                ),
            )
        elif isinstance(ev, ClientKeyRevoked):
            yield Statement(
                "UPDATE {client_keys} SET revoked_at = $3, revoked_by = $4 "
                "WHERE deployment = $1 AND key_id = $2",
                (ev.deployment, ev.key_id, event.recorded_at, ev.revoked_by),
            )


class DeploymentOwnersProjection(Projection):
    """Which group owns each deployment name now, and whether it is deleted, from the
    scheduler's ``DeploymentCreated`` and ``DeploymentDeleted``.

    A key records the group that owned its deployment when it was made; a key whose
    deployment has since been deleted (or deleted and created again by another group)
    must stop working at once, without waiting for anyone to revoke it. Only the payload
    field ``group`` of ``DeploymentCreated`` (documented in docs/events.md) is read, so the
    keys service does not depend on the scheduler's code. A replay reads the scheduler's
    event store (schema ``scheduler``) in the same database."""

    name = "deployment_owners"
    schema = SCHEMA
    sources = ((SCHEDULER_SCHEMA, "deployment"),)
    tables = {
        # group_name is NULL for a deployment seen deleted before it was seen created
        # (events older than the stream's retention when this projection first ran).
        "deployment_owners": (
            "name text PRIMARY KEY, group_name text, deleted boolean NOT NULL, "
            "changed_at timestamptz NOT NULL"
        ),
    }

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        """Upserts: a deployment name is created again after a delete (a new life)."""
        name = event.aggregate_id
        if event.event_type == "DeploymentCreated":
            yield Statement(
                "INSERT INTO {deployment_owners} (name, group_name, deleted, changed_at) "
                "VALUES ($1, $2, false, $3) ON CONFLICT (name) DO UPDATE SET "
                "group_name = excluded.group_name, deleted = false, "
                "changed_at = excluded.changed_at",
                (name, str(event.payload["group"]), event.recorded_at),
            )
        elif event.event_type == "DeploymentDeleted":
            yield Statement(
                "INSERT INTO {deployment_owners} (name, group_name, deleted, changed_at) "
                "VALUES ($1, NULL, true, $2) ON CONFLICT (name) DO UPDATE SET "
                "deleted = true, changed_at = excluded.changed_at",
                (name, event.recorded_at),
            )
