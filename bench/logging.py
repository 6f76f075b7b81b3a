"""bench/logging: log lines ingested end to end, and the last 2000 lines of a replica.

Embedded PostgreSQL and NATS with fsync on (as ``shipyard up`` runs them) and the logging
service in this process (its ingester and queries, as ``python -m shipyard_logging``
builds them). The bench publishes to ``LOGS`` the way the scheduler's log shipper does:
batches of 1,000 lines (~100 bytes each) with their ``Nats-Msg-Id``, 50 batches in
flight, for one replica with 1M lines and another with 200k (``--quick``: 100k and 20k).

1. **ingest lines/s**: from the first publish until every line is committed in
   PostgreSQL (publish, JetStream, the ingester, the day-partitioned table);
2. **last 2000 lines of a replica** with 1M stored (the CLI's default
   ``shipyard deploy logs D --instance I``): the service's query (SQL plus building the
   answer), median and max of 20, and the same for the whole deployment.

Run: ``./dev bench logging`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._machine import describe
from shipyard_core import bus
from shipyard_core.auth import Principal
from shipyard_core.embedded import start_nats, start_postgres
from shipyard_core.logbatch import Line, LogBatch
from shipyard_logging.domain import log_query
from shipyard_logging.main import build_service
from shipyard_logging.settings import LoggingSettings
from shipyard_testing import StaticAuthenticator

RESULTS = Path(__file__).parent / "results" / "logging.json"
BATCH = 1000
IN_FLIGHT = 50


async def _publish(js: Any, source: str, n: int) -> None:
    pos = 0
    now = datetime.now(UTC)
    pending = []
    for b in range(n // BATCH):
        lines = []
        for i in range(BATCH):
            text = (
                f"2026-11-22 INFO request {b * BATCH + i} served in 3.2ms by worker 1234 "
                "path=/v2/models/iris/infer status=200"
            )
            lines.append(Line(pos, now, text))
            pos += len(text) + 1
        batch = LogBatch("instance", source, "iris", 1, "output", lines[0].offset, pos, lines)
        pending.append(
            js.publish(
                batch.subject,
                batch.encode(),
                stream=bus.LOGS_STREAM,
                headers={"Nats-Msg-Id": batch.msg_id},
            )
        )
        if len(pending) >= IN_FLIGHT:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


async def run(quick: bool = False) -> None:
    """Runs the benchmark and writes ``bench/results/logging.json``."""
    sizes = {"iris-r1-aaaaa": 100_000, "iris-r1-bbbbb": 20_000}
    if not quick:
        sizes = {"iris-r1-aaaaa": 1_000_000, "iris-r1-bbbbb": 200_000}
    results: dict[str, Any] = {"machine": describe(), "lines": sizes}
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-logs-") as tmp:
        root = Path(tmp)
        pg = start_postgres(root / "postgres", fsync=True)
        nats = start_nats(root / "nats")
        try:
            settings = LoggingSettings(
                database_url=pg.create_database("bench"),
                nats_url=nats.url,
                grpc_port=0,
                log_json=False,
                data_dir=root,
            )
            service = await build_service(settings, StaticAuthenticator({}))
            nc = await bus.connect(nats.url, "bench-logging")
            try:
                async with service.host:
                    js = nc.jetstream()
                    start = time.monotonic()
                    for source, n in sizes.items():
                        await _publish(js, source, n)
                    published = time.monotonic() - start
                    while await service.ingester.pending() > 0:
                        await asyncio.sleep(0.1)
                    ingested = time.monotonic() - start
                    total = sum(sizes.values())
                    results["publish_lines_per_s"] = round(total / published)
                    results["ingest_lines_per_s"] = round(total / ingested)
                    admin = Principal("root", True)
                    for label, query in (
                        ("replica_1m", log_query("iris", "iris-r1-aaaaa")),
                        ("deployment", log_query("iris")),
                    ):
                        times = []
                        for _ in range(20):
                            begin = time.perf_counter()
                            lines = await service.queries.tail(admin, query, 2000)
                            times.append((time.perf_counter() - begin) * 1000)
                        assert len(lines) == 2000, len(lines)
                        results[f"last_2000_{label}_ms"] = {
                            "median": round(statistics.median(times), 2),
                            "max": round(max(times), 2),
                        }
            finally:
                await nc.close()
        finally:
            nats.stop()
            pg.stop()
    results["targets"] = {
        "ingest_at_least_50k_lines_per_s": results["ingest_lines_per_s"] >= 50_000,
        "last_2000_under_50ms": results["last_2000_replica_1m_ms"]["median"] < 50,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
