"""The connection pool: what a released connection keeps and what it loses."""

from __future__ import annotations

from shipyard_core import db


async def test_a_released_connection_is_not_reset_beyond_its_transaction(
    database_url: str,
) -> None:
    pool = await db.create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'kept'")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        # Same connection (max_size=1): no RESET ALL ran on release, so nothing was sent
        # beyond what the caller sent.
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            assert await conn.fetchval("SHOW application_name") == "kept"
            # json still decodes to Python objects (the pool's init ran).
            assert await conn.fetchval("SELECT '{\"a\": 1}'::jsonb") == {"a": 1}
    finally:
        await pool.close()


async def test_a_transaction_left_open_is_rolled_back_on_release(database_url: str) -> None:
    pool = await db.create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE left_open (n int)")
        conn = await pool.acquire()
        await conn.execute("BEGIN")  # a caller that never ends its transaction
        await conn.execute("INSERT INTO left_open VALUES (1)")
        await pool.release(conn)
        async with pool.acquire() as again:
            assert not again.is_in_transaction()
            assert await again.fetchval("SELECT count(*) FROM left_open") == 0
    finally:
        await pool.close()
