"""Read-your-writes: wait until a projection has applied a given event."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from shipyard_core.db import Conn
from shipyard_core.eventstore import StoredEvent, validate_identifier
from shipyard_core.projections.base import Projection
from shipyard_core.projections.runner import leader_lock_key


async def wait_until_projected(
    pool: asyncpg.Pool,
    schema: str,
    projection: str,
    events: list[StoredEvent],
    timeout: float = 5.0,  # noqa: ASYNC109 - a plain deadline; returning False is the signal
) -> bool:
    """Waits until ``projection`` has applied the last of ``events`` on each stream.

    Commands whose caller reads the result at once (create a user, then use its token)
    call this before answering. Returns False on timeout rather than failing the
    command: the write is durable, only its visibility is late."""
    if not events:
        return True
    want: dict[str, int] = {}
    for ev in events:
        want[ev.stream_id] = max(want.get(ev.stream_id, 0), ev.version)
    sql = (
        f"SELECT count(*) FROM {validate_identifier(schema)}.projection_positions p "
        "JOIN unnest($2::text[], $3::bigint[]) AS w(stream_id, version) "
        "ON p.stream_id = w.stream_id AND p.version >= w.version WHERE p.projection = $1"
    )
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        done = await pool.fetchval(sql, projection, list(want), list(want.values()))
        if done == len(want):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)  # polling with backoff; the usual wait is a few ms
        delay = min(delay * 2, 0.05)


async def projection_has_leader(conn: Conn, projection: Projection | type[Projection]) -> bool:
    """Whether some process is applying ``projection`` right now (its runner holds the
    leader lock). Lets a command run outside the server (e.g. ``bootstrap-admin``) skip a
    wait that nobody would end."""
    # pg_try_advisory_lock(bigint) shows in pg_locks with the key split in two 32-bit
    # halves (classid: high, objid: low) and objsubid 1.
    held = await conn.fetchval(
        """
        SELECT EXISTS (
            SELECT 1 FROM pg_locks l, (SELECT hashtext($1)::bigint AS k) key
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND l.classid = ((key.k >> 32) & 4294967295)::oid
              AND l.objid = (key.k & 4294967295)::oid)
        """,
        leader_lock_key(projection),
    )
    return bool(held)
