"""Read-your-writes: wait until a projection has applied a given event."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from shipyard_core.eventstore import StoredEvent, validate_identifier


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
