"""Request metrics: the METRICS consumer and the queries over its per-minute buckets.

The consumer adds each gateway report to the minute buckets of its deployments, records
the report's ``(gateway, seq)`` in the same transaction (a redelivered report is skipped),
then acks. Unreadable reports are parked on ``DLQ``. Retention drops whole day partitions.

Access as for logs: a caller reads a deployment's metrics from the times it belonged to
one of their groups (its lives' creation times, from ``deployment_lives``); any other
deployment is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shipyard_core.auth import Principal
from shipyard_core.bus import METRICS_STREAM
from shipyard_core.db import Conn
from shipyard_core.errors import InvalidArgument
from shipyard_logging.adapters import metrics_store, store
from shipyard_logging.app.consumer import INFRA_ERRORS, LeaderConsumer
from shipyard_logging.app.queries import deployment_not_found
from shipyard_logging.domain.metrics import Counts, Summary, parse_report, summarize
from shipyard_logging.projections import DeploymentLivesProjection

log = logging.getLogger(__name__)

METRICS_DURABLE = "logging_metrics"
DEFAULT_RANGE = timedelta(hours=1)
MAX_POINTS = 60
"""Points of a series when the caller names no step."""
MAX_STEPS = 10_000

_LIVES = DeploymentLivesProjection.live_tables()["deployment_lives"]


class MetricsIngester(LeaderConsumer):
    """Runs the ``METRICS`` consumer until stopped."""

    stream = METRICS_STREAM
    durable = METRICS_DURABLE
    filter_subject = "metrics.gateway.>"
    what = "metrics ingest"

    def __init__(
        self,
        dsn: str,
        js: JetStreamContext,
        *,
        retention: timedelta,
        retention_interval: float = 600.0,
        batch_size: int = 256,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(dsn, js, retention_interval=retention_interval, batch_size=batch_size)
        self.retention = retention
        self.clock = clock
        self.reports = 0
        self.duplicates = 0
        self._partitions: set[date] = set()

    async def prepare(self, conn: Conn) -> None:
        """The tables exist; the known partitions are cached."""
        await metrics_store.ensure_tables(conn)
        self._partitions = set(await store.partitions(conn, metrics_store.MINUTES))

    async def drop_expired(self, conn: Conn) -> list[str]:
        """Drops the minute partitions past the retention and old dedupe rows."""
        cutoff = self.clock() - self.retention
        dropped = await store.drop_partitions_before(conn, cutoff, metrics_store.MINUTES)
        await metrics_store.forget_reports_before(conn, cutoff)
        if dropped:
            log.info("dropped expired metric partitions: %s", ", ".join(dropped))
            self._partitions = set(await store.partitions(conn, metrics_store.MINUTES))
        return dropped

    async def process(self, conn: Conn, msgs: list[Msg]) -> None:
        """Adds the reports in one transaction, then acks."""
        reports = []
        for msg in msgs:
            try:
                reports.append((msg, parse_report(msg.data)))
            except ValueError as exc:
                await self.dead_letter(msg, str(exc))
        if not reports:
            return
        now = self.clock()
        oldest = now - self.retention
        kept = [(m, r) for m, r in reports if r.minute >= oldest]
        days = {store.day_of(r.minute) for _, r in kept}
        await store.ensure_partitions(conn, days, self._partitions, metrics_store.MINUTES)
        try:
            async with conn.transaction():
                added = 0
                rows: dict[tuple[str, datetime], Counts] = {}
                for _, report in kept:
                    if not await metrics_store.claim_report(conn, report.gateway, report.seq, now):
                        self.duplicates += 1
                        continue
                    added += 1
                    for deployment, counts in report.deployments.items():
                        row = rows.setdefault((deployment, report.minute), Counts())
                        row.add(counts)
                await metrics_store.add_minutes(conn, [(d, m, c) for (d, m), c in rows.items()])
        except INFRA_ERRORS:
            raise
        except asyncpg.PostgresError as exc:
            # Not the data's fault as far as we can tell: put them back for a retry.
            log.warning("metrics ingest failed, retrying: %s", exc)
            for msg, _ in reports:
                await msg.nak(delay=1.0)
            return
        self.reports += added
        await asyncio.gather(*(m.ack() for m, _ in reports))


@dataclass(frozen=True)
class MetricsView:
    """A deployment's metrics over a range: the total and one point per step."""

    deployment: str
    total: Summary
    series: list[Summary]
    step: timedelta


def _floor_minute(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


class MetricsQueries:
    """Metric reads over the pool; every method takes the caller."""

    def __init__(
        self, pool: asyncpg.Pool, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.pool = pool
        self.clock = clock

    async def _windows(
        self, caller: Principal, deployment: str
    ) -> list[tuple[datetime | None, datetime | None]] | None:
        """The time windows of the deployment the caller reads (None: all of it)."""
        rows = await self.pool.fetch(
            f"SELECT group_name, created_at FROM {_LIVES} WHERE name = $1 ORDER BY first_revision",
            deployment,
        )
        if caller.admin:
            return None
        windows: list[tuple[datetime | None, datetime | None]] = []
        for i, row in enumerate(rows):
            if caller.can_see(row["group_name"]):
                begin = None if i == 0 else row["created_at"]
                end = rows[i + 1]["created_at"] if i + 1 < len(rows) else None
                windows.append((begin, end))
        if not windows:
            raise deployment_not_found(deployment)
        return None if windows == [(None, None)] else windows

    async def metrics(
        self,
        caller: Principal,
        deployment: str,
        since: datetime | None,
        until: datetime | None,
        step_minutes: int,
    ) -> MetricsView:
        """QPS, success and error rates and latency percentiles of ``[since, until)``
        (default: the last hour), in total and per step (default: at most 60 points)."""
        windows = await self._windows(caller, deployment)
        end = until or self.clock()
        start = _floor_minute(since or end - DEFAULT_RANGE)
        if start >= end:
            raise InvalidArgument(
                "until", f"must be after since ({start.isoformat()})", "swap them"
            )
        if step_minutes < 0:
            raise InvalidArgument("step_minutes", f"must be >= 0, got {step_minutes}")
        minutes_in_range = math.ceil((end - start) / timedelta(minutes=1))
        if step_minutes == 0:
            # The start is floored to its minute, so "the last hour" spans 61 minutes (the
            # first and the current one partly): that is still an hour of 1-minute points.
            step_minutes = max(1, math.ceil((minutes_in_range - 1) / MAX_POINTS))
        if minutes_in_range / step_minutes > MAX_STEPS:
            raise InvalidArgument(
                "step_minutes",
                f"gives more than {MAX_STEPS} points over this range",
                "use a larger step or a shorter range",
            )
        async with self.pool.acquire() as conn:
            minutes = await metrics_store.read_minutes(conn, deployment, start, end)
        if windows is not None:
            minutes = [
                (m, c)
                for m, c in minutes
                if any((b is None or m >= b) and (e is None or m < e) for b, e in windows)
            ]
        step = timedelta(minutes=step_minutes)
        total, series = summarize(start, end, step, minutes)
        return MetricsView(deployment, total, series, step)
