"""The scheduler's read model: deployments, revisions, history, the last 200 instances
of each deployment, and (as a query over these) the gateway's routing table.

Every change that can move a route also sends ``pg_notify('shipyard_routes', name)`` in
the projection's transaction, so ``WatchRoutes`` pushes it the moment it commits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from shipyard_core.db import Conn
from shipyard_core.eventstore import StoredEvent
from shipyard_core.projections import Projection, Statement, Tables
from shipyard_scheduler.domain.events import SCHEDULER_UPCASTERS, SPEC_V1_DEFAULTS

SCHEMA = "scheduler"
ROUTES_CHANNEL = "shipyard_routes"
INSTANCES_KEPT = 200


def _notify(deployment: str) -> Statement:
    return Statement(f"SELECT pg_notify('{ROUTES_CHANNEL}', $1::text)", (deployment,))


def _history(event: StoredEvent, action: str, message: str = "") -> Statement:
    """A history row copying the deployment's current revision (run after its update)."""
    return Statement(
        "INSERT INTO {history} (name, seq, revision, action, actor, at, stopped, spec, "
        "group_name, replicas, message) "
        "SELECT d.name, $2, d.revision, $3, $4, $5, d.status = 'stopped', d.spec, "
        "d.group_name, d.replicas, $6 FROM {deployments} d WHERE d.name = $1",
        (
            event.aggregate_id,
            event.version,
            action,
            str(event.metadata.get("actor", "")),
            event.recorded_at,
            message,
        ),
    )


class DeploymentsProjection(Projection):
    """Rows for every scheduler query, and the routes the gateway watches."""

    name = "deployments"
    schema = SCHEMA
    sources = ((SCHEMA, "deployment"), (SCHEMA, "instance"))
    tables = {
        "deployments": (
            "name text PRIMARY KEY, group_name text NOT NULL, status text NOT NULL, "
            "message text NOT NULL DEFAULT '', revision int NOT NULL, "
            "active_revision int NOT NULL, failed_revision int NOT NULL DEFAULT 0, "
            "spec jsonb NOT NULL, replicas int NOT NULL, min_replicas int NOT NULL, "
            "max_replicas int NOT NULL, target_inflight int NOT NULL, "
            "readme text NOT NULL DEFAULT '', readme_updated_by text NOT NULL DEFAULT '', "
            "readme_updated_at timestamptz, created_by text NOT NULL, "
            "created_at timestamptz NOT NULL, updated_by text NOT NULL, "
            "updated_at timestamptz NOT NULL"
        ),
        "revisions": (
            "name text NOT NULL, revision int NOT NULL, spec jsonb NOT NULL, "
            "created_by text NOT NULL, created_at timestamptz NOT NULL, "
            "message text NOT NULL DEFAULT '', PRIMARY KEY (name, revision)"
        ),
        "history": (
            "name text NOT NULL, seq int NOT NULL, revision int NOT NULL, "
            "action text NOT NULL, actor text NOT NULL, at timestamptz NOT NULL, "
            "stopped bool NOT NULL, spec jsonb NOT NULL, group_name text NOT NULL, "
            "replicas int NOT NULL, message text NOT NULL, PRIMARY KEY (name, seq)"
        ),
        "instances": (
            "instance_id text PRIMARY KEY, deployment text NOT NULL, revision int NOT NULL, "
            "status text NOT NULL, address text NOT NULL DEFAULT '', "
            "restarts int NOT NULL DEFAULT 0, message text NOT NULL DEFAULT '', "
            "backend text NOT NULL, created_at timestamptz NOT NULL, "
            "ready_at timestamptz, ended_at timestamptz"
        ),
    }
    indexes = (
        ("deployments", "group_name"),
        ("instances", "deployment, created_at"),
        ("instances", "status"),
    )
    upcasters = SCHEDULER_UPCASTERS

    @classmethod
    async def create_tables(cls, conn: Conn, tables: Tables | None = None) -> None:
        """Creates the tables if missing, and gives the specs that rows made before
        version 2 of the deployment events hold what the upcaster gives their events
        (``image_kind`` ``pack``, no ``image_ref``), so a table rebuilt by replay equals
        the live one. Once done, the check finds nothing to change."""
        await super().create_tables(conn, tables)
        tables = tables or cls.live_tables()
        # Constants of this module, as SQL literals (JSON strings need no escaping here).
        defaults = ", ".join(f"'{k}', '{v}'" for k, v in SPEC_V1_DEFAULTS.items())
        for table in ("deployments", "revisions", "history"):
            await conn.execute(
                f"UPDATE {tables[table]} SET spec = spec || jsonb_build_object({defaults}) "
                "WHERE NOT spec ? 'image_kind'"
            )

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        if event.aggregate == "instance":
            yield from self._instance(event)
        else:
            yield from self._deployment(event)

    def _deployment(self, event: StoredEvent) -> Iterator[Statement]:
        p, at, name = event.payload, event.recorded_at, event.aggregate_id
        actor = str(event.metadata.get("actor", ""))
        t = event.event_type
        if t == "DeploymentCreated":
            spec = p["spec"]
            yield Statement(
                "INSERT INTO {deployments} (name, group_name, status, revision, "
                "active_revision, spec, replicas, min_replicas, max_replicas, target_inflight, "
                "readme, readme_updated_by, readme_updated_at, created_by, created_at, "
                "updated_by, updated_at) VALUES ($1, $2, 'deploying', $3, $3, $4::jsonb, $5, "
                "$6, $7, $8, $9, $10, $11, $10, $11, $10, $11) "
                "ON CONFLICT (name) DO UPDATE SET group_name = $2, status = 'deploying', "
                "message = '', revision = $3, active_revision = $3, failed_revision = 0, "
                "spec = $4::jsonb, replicas = $5, min_replicas = $6, max_replicas = $7, "
                "target_inflight = $8, readme = $9, readme_updated_by = $10, "
                "readme_updated_at = $11, created_by = $10, created_at = $11, "
                "updated_by = $10, updated_at = $11",
                (
                    name,
                    p["group"],
                    p["revision"],
                    spec,
                    p["replicas"],
                    spec["min_replicas"],
                    spec["max_replicas"],
                    spec["target_inflight"],
                    p["readme"],
                    p["created_by"],
                    at,
                ),
            )
            yield self._revision(name, p["revision"], spec, p["created_by"], at, "")
            yield _history(event, "create")
        elif t == "DeploymentUpdated":
            spec = p["spec"]
            yield Statement(
                "UPDATE {deployments} SET revision = $2, spec = $3::jsonb, replicas = $4, "
                "min_replicas = $5, max_replicas = $6, target_inflight = $7, "
                "status = CASE WHEN status = 'stopped' THEN status ELSE 'deploying' END, "
                "message = '', updated_by = $8, updated_at = $9 WHERE name = $1",
                (
                    name,
                    p["revision"],
                    spec,
                    p["replicas"],
                    spec["min_replicas"],
                    spec["max_replicas"],
                    spec["target_inflight"],
                    actor,
                    at,
                ),
            )
            yield self._revision(name, p["revision"], spec, actor, at, p["message"])
            yield _history(event, "update", p["message"])
        elif t == "DeploymentScaled":
            yield Statement(
                "UPDATE {deployments} SET min_replicas = $2, max_replicas = $3, "
                "target_inflight = $4, replicas = $5, "
                "spec = spec || jsonb_build_object('min_replicas', $2::int, "
                "'max_replicas', $3::int, 'target_inflight', $4::int), "
                "status = CASE WHEN status = 'deployed' THEN 'deploying' ELSE status END, "
                "updated_by = $6, updated_at = $7 WHERE name = $1",
                (
                    name,
                    p["min_replicas"],
                    p["max_replicas"],
                    p["target_inflight"],
                    p["replicas"],
                    actor,
                    at,
                ),
            )
            yield _history(event, "scale")
        elif t == "DeploymentAutoscaled":
            yield Statement(
                "UPDATE {deployments} SET replicas = $2 WHERE name = $1", (name, p["replicas"])
            )
        elif t in ("DeploymentStopped", "DeploymentDeleted"):
            status, action = (
                ("stopped", "stop") if t == "DeploymentStopped" else ("deleted", "delete")
            )
            yield Statement(
                "UPDATE {deployments} SET status = $2, message = '', replicas = 0, "
                "updated_by = $3, updated_at = $4 WHERE name = $1",
                (name, status, actor, at),
            )
            yield _history(event, action)
        elif t == "DeploymentStarted":
            yield Statement(
                "UPDATE {deployments} SET status = 'deploying', message = '', "
                "failed_revision = 0, replicas = $2, updated_by = $3, updated_at = $4 "
                "WHERE name = $1",
                (name, p["replicas"], actor, at),
            )
            yield _history(event, "start")
        elif t == "DeploymentReadmeSet":
            yield Statement(
                "UPDATE {deployments} SET readme = $2, readme_updated_by = $3, "
                "readme_updated_at = $4 WHERE name = $1",
                (name, p["markdown"], actor, at),
            )
            yield _history(event, "readme")
        elif t == "RevisionActivated":
            yield Statement(
                "UPDATE {deployments} SET active_revision = $2 WHERE name = $1",
                (name, p["revision"]),
            )
        elif t == "DeploymentStatusChanged":
            yield Statement(
                "UPDATE {deployments} SET status = $2, message = $3, "
                "failed_revision = CASE WHEN $2 = 'failed' THEN $4 ELSE failed_revision END "
                "WHERE name = $1",
                (name, p["status"], p["message"], p["revision"]),
            )
        yield _notify(name)

    @staticmethod
    def _revision(
        name: str, revision: int, spec: object, actor: str, at: object, message: str
    ) -> Statement:
        return Statement(
            "INSERT INTO {revisions} (name, revision, spec, created_by, created_at, message) "
            "VALUES ($1, $2, $3::jsonb, $4, $5, $6)",
            (name, revision, spec, actor, at, message),
        )

    def _instance(self, event: StoredEvent) -> Iterator[Statement]:
        p, at, iid = event.payload, event.recorded_at, event.aggregate_id
        t = event.event_type
        if t == "InstanceCreated":
            yield Statement(
                "INSERT INTO {instances} (instance_id, deployment, revision, status, backend, "
                "created_at) VALUES ($1, $2, $3, 'pending', $4, $5)",
                (iid, p["deployment"], p["revision"], p["backend"], at),
            )
            # Keep the newest 200 of the deployment: deterministic (by the events' times
            # and ids), so a replay prunes exactly the same rows.
            yield Statement(
                "DELETE FROM {instances} WHERE deployment = $1 AND instance_id IN ("
                "SELECT instance_id FROM {instances} WHERE deployment = $1 "
                "ORDER BY created_at DESC, instance_id DESC OFFSET $2)",
                (p["deployment"], INSTANCES_KEPT),
            )
            return
        if t == "InstanceStarting":
            yield Statement(
                "UPDATE {instances} SET status = 'starting', address = $2, restarts = $3 "
                "WHERE instance_id = $1",
                (iid, p["address"], p["restarts"]),
            )
        elif t == "InstanceReady":
            yield Statement(
                "UPDATE {instances} SET status = 'ready', address = $2, message = '', "
                "ready_at = $3 WHERE instance_id = $1",
                (iid, p["address"], at),
            )
        elif t == "InstanceFailed":
            yield Statement(
                "UPDATE {instances} SET status = 'failed', restarts = $2, message = $3 "
                "WHERE instance_id = $1",
                (iid, p["restarts"], p["message"]),
            )
        elif t == "InstanceTerminated":
            yield Statement(
                "UPDATE {instances} SET status = 'terminated', ended_at = $2, "
                "message = CASE WHEN message = '' THEN $3 ELSE message END "
                "WHERE instance_id = $1",
                (iid, at, p["reason"]),
            )
        yield Statement(
            f"SELECT pg_notify('{ROUTES_CHANNEL}', deployment) FROM {{instances}} "
            "WHERE instance_id = $1",
            (iid,),
        )
