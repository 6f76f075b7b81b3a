"""The tables of request metrics: per-deployment, per-minute counts in day partitions.

``logging.metric_minutes`` has one row per deployment and minute (UTC), partitioned by
day so that retention drops whole days. ``logging.metric_reports`` remembers which
gateway reports (gateway, seq) were added, so a redelivered report is not added twice;
its rows go with the same retention.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from shipyard_core.db import Conn
from shipyard_logging.adapters.store import SCHEMA
from shipyard_logging.domain.metrics import BUCKET_KEYS, Counts

MINUTES = "metric_minutes"
REPORTS = f"{SCHEMA}.metric_reports"

_DDL = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.{MINUTES} (
        deployment text NOT NULL,
        minute timestamptz NOT NULL,
        requests bigint NOT NULL,
        ok bigint NOT NULL,
        client_errors bigint NOT NULL,
        server_errors bigint NOT NULL,
        latency_sum_ms double precision NOT NULL,
        buckets bigint[] NOT NULL,
        async_requests bigint NOT NULL,
        PRIMARY KEY (deployment, minute)
    ) PARTITION BY RANGE (minute)""",
    f"""CREATE TABLE IF NOT EXISTS {REPORTS} (
        gateway text NOT NULL,
        seq bigint NOT NULL,
        received_at timestamptz NOT NULL,
        PRIMARY KEY (gateway, seq)
    )""",
    f"CREATE INDEX IF NOT EXISTS metric_reports__received_at ON {REPORTS} (received_at)",
)


async def ensure_tables(conn: Conn) -> None:
    """Creates the metrics tables if missing."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('shipyard.logging.ddl'))")
        for statement in _DDL:
            await conn.execute(statement)


async def claim_report(conn: Conn, gateway: str, seq: int, now: datetime) -> bool:
    """Records that report ``(gateway, seq)`` is added in this transaction; False when it
    was added before (a redelivery)."""
    added = await conn.fetchval(
        f"INSERT INTO {REPORTS} (gateway, seq, received_at) VALUES ($1, $2, $3) "
        "ON CONFLICT (gateway, seq) DO NOTHING RETURNING true",
        gateway,
        seq,
        now,
    )
    return bool(added)


async def add_minutes(conn: Conn, rows: Sequence[tuple[str, datetime, Counts]]) -> None:
    """Adds counts to their (deployment, minute) rows (their partitions must exist)."""
    await conn.executemany(
        f"""INSERT INTO {SCHEMA}.{MINUTES} AS m (deployment, minute, requests, ok,
                client_errors, server_errors, latency_sum_ms, buckets, async_requests)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT (deployment, minute) DO UPDATE SET
                requests = m.requests + EXCLUDED.requests,
                ok = m.ok + EXCLUDED.ok,
                client_errors = m.client_errors + EXCLUDED.client_errors,
                server_errors = m.server_errors + EXCLUDED.server_errors,
                latency_sum_ms = m.latency_sum_ms + EXCLUDED.latency_sum_ms,
                buckets = ARRAY(
                    SELECT a + b FROM unnest(m.buckets, EXCLUDED.buckets) WITH ORDINALITY
                    AS t(a, b, i) ORDER BY i
                ),
                async_requests = m.async_requests + EXCLUDED.async_requests""",
        [
            (
                deployment,
                minute,
                c.requests,
                c.ok,
                c.client_errors,
                c.server_errors,
                c.latency_sum_ms,
                c.buckets,
                c.async_requests,
            )
            for deployment, minute, c in rows
        ],
    )


async def read_minutes(
    conn: Conn, deployment: str, start: datetime, end: datetime
) -> list[tuple[datetime, Counts]]:
    """The deployment's minutes in ``[start, end)``, oldest first."""
    rows = await conn.fetch(
        f"SELECT minute, requests, ok, client_errors, server_errors, latency_sum_ms, "
        f"buckets, async_requests FROM {SCHEMA}.{MINUTES} "
        "WHERE deployment = $1 AND minute >= $2 AND minute < $3 ORDER BY minute",
        deployment,
        start,
        end,
    )
    found = []
    for r in rows:
        buckets = list(r["buckets"])
        buckets += [0] * (len(BUCKET_KEYS) - len(buckets))
        found.append(
            (
                r["minute"],
                Counts(
                    requests=r["requests"],
                    ok=r["ok"],
                    client_errors=r["client_errors"],
                    server_errors=r["server_errors"],
                    latency_sum_ms=r["latency_sum_ms"],
                    buckets=buckets[: len(BUCKET_KEYS)],
                    async_requests=r["async_requests"],
                ),
            )
        )
    return found


async def forget_reports_before(conn: Conn, cutoff: datetime) -> None:
    """Deletes the dedupe rows of reports received before ``cutoff``."""
    await conn.execute(f"DELETE FROM {REPORTS} WHERE received_at < $1", cutoff)
