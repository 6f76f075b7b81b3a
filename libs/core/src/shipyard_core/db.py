"""PostgreSQL connection pools with Shipyard's codecs."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# A connection of its own or one borrowed from a pool: both run the same queries.
Conn = asyncpg.Connection | PoolConnectionProxy


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python objects; the event store passes pre-encoded text where
    # it matters for speed.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """What a pool does with a connection given back, beyond what asyncpg always does (roll
    back a transaction left open, drop listener callbacks): nothing.

    asyncpg's default also sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` on every release: one more round trip per acquire, measured at six per async
    request. Shipyard keeps no session state on pool connections: advisory locks and
    long-lived LISTENs use dedicated connections (:func:`connect`), a LISTEN on a pool
    connection is removed before it is released, and nothing runs ``SET``."""


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool:
    """A pool whose connections decode json/jsonb to Python objects."""
    kwargs.setdefault("reset", _keep_session)
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, **kwargs
    )
    assert pool is not None
    return pool


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection with the same codecs as ``create_pool``'s."""
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    return conn
