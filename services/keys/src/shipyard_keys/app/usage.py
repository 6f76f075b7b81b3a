"""When each client key was last used: telemetry, not events.

Recording every use as an event would put the gateway's request rate into the event
store forever. ``last_used_at`` only has to answer "is this key still in use?", so it is a
plain table (``keys.client_key_usage``), written by ``VerifyClientKey`` at most once a
minute per key: each process skips keys it wrote within the interval without touching the
database, and the statement itself skips rows written within it by any process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import asyncpg

from shipyard_core.db import Conn
from shipyard_keys.projections import SCHEMA

log = logging.getLogger(__name__)

USAGE_TABLE = f"{SCHEMA}.client_key_usage"
"""The telemetry table: (deployment, key_id) -> last_used_at. Key ids are unique per
deployment only, hence the pair."""

USAGE_INTERVAL_SECONDS = 60.0
"""``last_used_at`` is at most this stale; also the fewest seconds between two writes of
one key's row."""

_DDL = f"""
CREATE TABLE IF NOT EXISTS {USAGE_TABLE} (
    deployment text NOT NULL,
    key_id text NOT NULL,
    last_used_at timestamptz NOT NULL,
    PRIMARY KEY (deployment, key_id)
)
"""

# An upsert that changes a row only when it is older than the interval. Not the event
# store's write path (where a conflict must be seen): a lost race here loses nothing.
_TOUCH = f"""
INSERT INTO {USAGE_TABLE} AS u (deployment, key_id, last_used_at) VALUES ($1, $2, now())
ON CONFLICT (deployment, key_id) DO UPDATE SET last_used_at = excluded.last_used_at
WHERE u.last_used_at < now() - make_interval(secs => $3)
"""

# Forget write times older than the interval once this many keys are remembered.
_MAX_REMEMBERED = 10_000


async def ensure_usage_table(conn: Conn) -> None:
    """Creates ``keys.client_key_usage`` if missing (idempotent)."""
    await conn.execute(_DDL)


class KeyUsage:
    """Records uses of client keys, at most once per ``interval_seconds`` per key."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        interval_seconds: float = USAGE_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._written: dict[tuple[str, str], float] = {}

    async def touch(self, deployment: str, key_id: str) -> None:
        """Notes that the key was used now. Never fails: a lost telemetry write must not
        refuse a valid key (it is logged)."""
        now = self._clock()
        key = (deployment, key_id)
        last = self._written.get(key)
        if last is not None and now - last < self.interval_seconds:
            return
        try:
            await self.pool.execute(_TOUCH, deployment, key_id, self.interval_seconds)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not record the use of client key %s: %s", key_id, exc)
            return
        if len(self._written) >= _MAX_REMEMBERED:
            self._written = {
                k: t for k, t in self._written.items() if now - t < self.interval_seconds
            }
        self._written[key] = now
