"""The catalog projection: builds, image versions and readmes, for queries."""

from __future__ import annotations

from collections.abc import Iterable

from shipyard_core.db import Conn
from shipyard_core.eventstore import StoredEvent
from shipyard_core.projections import Projection, Statement, Tables
from shipyard_imagebuild.domain.events import IMAGEBUILD_UPCASTERS

SCHEMA = "imagebuild"


class CatalogProjection(Projection):
    """Rows for ListBuilds/GetBuild and ListImages/GetImage/GetReadme."""

    name = "catalog"
    schema = SCHEMA
    sources = ((SCHEMA, "build"), (SCHEMA, "image"))
    tables = {
        "builds": (
            "build_id text PRIMARY KEY, group_name text NOT NULL, name text NOT NULL, "
            "state text NOT NULL, version int NOT NULL DEFAULT 0, "
            "cache_hit bool NOT NULL DEFAULT false, reason text NOT NULL DEFAULT '', "
            "log_tail text NOT NULL DEFAULT '', requested_by text NOT NULL, "
            "queued_at timestamptz NOT NULL, started_at timestamptz, finished_at timestamptz, "
            "attempts int NOT NULL DEFAULT 0, source_digest text NOT NULL, "
            "source_name text NOT NULL"
        ),
        "images": (
            "group_name text NOT NULL, name text NOT NULL, version int NOT NULL, "
            "digest text NOT NULL, size_bytes bigint NOT NULL, pack_key text NOT NULL, "
            "python text NOT NULL, packages jsonb NOT NULL, script text NOT NULL, "
            "workers int NOT NULL, source_digest text NOT NULL, source_name text NOT NULL, "
            "cache_key text NOT NULL, build_id text NOT NULL, created_by text NOT NULL, "
            "created_at timestamptz NOT NULL, readme text NOT NULL, "
            "readme_updated_at timestamptz NOT NULL, readme_updated_by text NOT NULL, "
            "deleted bool NOT NULL DEFAULT false, "
            # ImageVersionCreated v2 (cluster builds). Last, in the order _ADDED_COLUMNS
            # adds them to older tables, so live and rebuilt tables compare equal.
            "kind text NOT NULL DEFAULT 'pack', image_ref text NOT NULL DEFAULT '', "
            "PRIMARY KEY (group_name, name, version)"
        ),
    }
    indexes = (("builds", "group_name, name"), ("images", "cache_key"))
    upcasters = IMAGEBUILD_UPCASTERS

    @classmethod
    async def create_tables(cls, conn: Conn, tables: Tables | None = None) -> None:
        """Creates the tables if missing, and adds the columns of later versions to tables
        made before them (``CREATE TABLE IF NOT EXISTS`` leaves an existing table as is)."""
        await super().create_tables(conn, tables)
        tables = tables or cls.live_tables()
        for table, column in _ADDED_COLUMNS:
            schema, name = tables[table].split(".", 1)
            exists = await conn.fetchval(
                "SELECT true FROM information_schema.columns "
                "WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
                schema,
                name,
                column.split()[0],
            )
            if not exists:  # ALTER TABLE locks the table even when it has nothing to do
                await conn.execute(f"ALTER TABLE {tables[table]} ADD COLUMN IF NOT EXISTS {column}")

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        p, at = event.payload, event.recorded_at
        actor = str(event.metadata.get("actor", ""))
        t = event.event_type
        if t == "BuildQueued":
            yield Statement(
                "INSERT INTO {builds} (build_id, group_name, name, state, requested_by, "
                "queued_at, source_digest, source_name) "
                "VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7)",
                (
                    event.aggregate_id,
                    p["group"],
                    p["name"],
                    p["requested_by"],
                    at,
                    p["source_digest"],
                    p["source_name"],
                ),
            )
        elif t == "BuildStarted":
            yield Statement(
                "UPDATE {builds} SET state = 'building', attempts = $2, started_at = $3 "
                "WHERE build_id = $1",
                (event.aggregate_id, p["attempt"], at),
            )
        elif t == "BuildSucceeded":
            yield Statement(
                "UPDATE {builds} SET state = 'succeeded', version = $2, cache_hit = $3, "
                "finished_at = $4 WHERE build_id = $1",
                (event.aggregate_id, p["version"], p["cache_hit"], at),
            )
        elif t == "BuildFailed":
            yield Statement(
                "UPDATE {builds} SET state = 'failed', reason = $2, log_tail = $3, "
                "finished_at = $4 WHERE build_id = $1",
                (event.aggregate_id, p["reason"], p["log_tail"], at),
            )
        elif t == "ImageVersionCreated":
            group, name = event.aggregate_id.split("/", 1)
            yield Statement(
                "INSERT INTO {images} (group_name, name, version, digest, size_bytes, pack_key, "
                "python, packages, script, workers, source_digest, source_name, cache_key, "
                "build_id, created_by, created_at, readme, readme_updated_at, readme_updated_by, "
                "kind, image_ref) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13, $14, "
                "$15, $16, $17, $16, $15, $18, $19)",
                (
                    group,
                    name,
                    p["version"],
                    p["digest"],
                    p["size_bytes"],
                    p["pack_key"],
                    p["python"],
                    p["packages"],  # jsonb: the connection codec encodes it
                    p["script"],
                    p["workers"],
                    p["source_digest"],
                    p["source_name"],
                    p["cache_key"],
                    p["build_id"],
                    p["created_by"],
                    at,
                    p["readme"],
                    p["kind"],
                    p["image_ref"],
                ),
            )
        elif t == "ImageReadmeSet":
            group, name = event.aggregate_id.split("/", 1)
            yield Statement(
                "UPDATE {images} SET readme = $4, readme_updated_at = $5, readme_updated_by = $6 "
                "WHERE group_name = $1 AND name = $2 AND version = $3",
                (group, name, p["version"], p["markdown"], at, actor),
            )
        elif t == "ImageVersionDeleted":
            group, name = event.aggregate_id.split("/", 1)
            yield Statement(
                "UPDATE {images} SET deleted = true "
                "WHERE group_name = $1 AND name = $2 AND version = $3",
                (group, name, p["version"]),
            )


_ADDED_COLUMNS = (
    ("images", "kind text NOT NULL DEFAULT 'pack'"),
    ("images", "image_ref text NOT NULL DEFAULT ''"),
)
"""Columns added after the first release, in table order (see ``create_tables``)."""
