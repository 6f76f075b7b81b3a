"""DDL of a service's event store schema (events, outbox, projection positions)."""

from __future__ import annotations

import re

from shipyard_core.db import Conn
from shipyard_core.errors import InvalidArgument

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def validate_identifier(name: str) -> str:
    """Schema and table names are interpolated into SQL, so only plain identifiers pass."""
    if not _IDENTIFIER.match(name):
        raise InvalidArgument("name", f"{name!r} is not a plain SQL identifier", "use [a-z0-9_]")
    return name


def _ddl(schema: str) -> str:
    s = validate_identifier(schema)
    # position: insertion order; tx_id: the writing transaction. Readers go in
    # (tx_id, position) order and only below pg_snapshot_xmin, so a transaction that
    # commits late can never be skipped (see docs/decisions/0003-commit-order.md).
    return f"""
    CREATE SCHEMA IF NOT EXISTS {s};
    CREATE TABLE IF NOT EXISTS {s}.events (
        position bigint GENERATED ALWAYS AS IDENTITY,
        tx_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
        stream_id text NOT NULL,
        version bigint NOT NULL CHECK (version > 0),
        event_id uuid NOT NULL,
        aggregate text NOT NULL,
        event_type text NOT NULL,
        schema_version int NOT NULL,
        payload jsonb NOT NULL,
        metadata jsonb NOT NULL,
        recorded_at timestamptz NOT NULL,
        PRIMARY KEY (stream_id, version)
    );
    CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON {s}.events (event_id);
    CREATE UNIQUE INDEX IF NOT EXISTS events_position ON {s}.events (position);
    CREATE INDEX IF NOT EXISTS events_commit_order ON {s}.events (tx_id, position);
    CREATE TABLE IF NOT EXISTS {s}.outbox (
        position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        tx_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
        event_id uuid NOT NULL,
        subject text NOT NULL,
        headers jsonb NOT NULL,
        body bytea NOT NULL
    );
    CREATE INDEX IF NOT EXISTS outbox_commit_order ON {s}.outbox (tx_id, position);
    CREATE TABLE IF NOT EXISTS {s}.projection_positions (
        projection text NOT NULL,
        stream_id text NOT NULL,
        version bigint NOT NULL,
        PRIMARY KEY (projection, stream_id)
    );
    CREATE TABLE IF NOT EXISTS {s}.projection_stats (
        projection text PRIMARY KEY,
        applied bigint NOT NULL DEFAULT 0,
        dead_lettered bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    """


async def ensure_schema(conn: Conn, schema: str) -> None:
    """Creates the service's event store schema if missing (idempotent, safe to race)."""
    async with conn.transaction():
        # Several replicas may start at once; serialize their DDL.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('shipyard.ddl.' || $1))", schema)
        await conn.execute(_ddl(schema))
