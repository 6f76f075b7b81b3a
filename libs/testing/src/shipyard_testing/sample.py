"""A small projection and a worker process for tests of the event-sourcing kit.

``python -m shipyard_testing.sample relay|projection DSN NATS_URL`` runs an outbox relay
or the counter projection as its own process, so tests can ``kill -9`` it mid-stream."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterable

from shipyard_core import bus, db
from shipyard_core.eventstore import NewEvent, StoredEvent, ensure_schema
from shipyard_core.outbox import OutboxRelay
from shipyard_core.projections import Projection, ProjectionRunner, Statement

SERVICE = "sample"


class CounterProjection(Projection):
    """Sums ``payload.n`` per stream; ``{"poison": true}`` makes the handler fail."""

    name = "counters"
    schema = SERVICE
    sources = ((SERVICE, "thing"),)
    tables = {
        "counters": "stream_id text PRIMARY KEY, total bigint NOT NULL, events int NOT NULL, "
        "last_type text NOT NULL",
    }
    indexes = (("counters", "total"),)

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        if event.payload.get("poison"):
            raise ValueError("poison payload")
        yield Statement(
            "INSERT INTO {counters} AS c (stream_id, total, events, last_type) "
            "VALUES ($1, $2, 1, $3) ON CONFLICT (stream_id) DO UPDATE SET "
            "total = c.total + EXCLUDED.total, events = c.events + 1, "
            "last_type = EXCLUDED.last_type",
            (event.stream_id, int(event.payload.get("n", 0)), event.event_type),
        )


def thing(stream: str, n: int = 1, **extra: object) -> NewEvent:
    """A sample event for stream ``thing:<stream>``."""
    return NewEvent(
        aggregate="thing",
        aggregate_id=stream,
        event_type="ThingCounted",
        schema_version=1,
        payload={"n": n, **extra},
    )


async def _main(role: str, dsn: str, nats_url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    conn = await db.connect(dsn)
    await ensure_schema(conn, SERVICE)
    await conn.close()
    nc = await bus.connect(nats_url, f"sample-{role}")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    if role == "relay":
        await OutboxRelay(dsn, js, SERVICE).run(stop)
    else:
        await ProjectionRunner(CounterProjection(), dsn, js, max_attempts=3).run(stop)
    await nc.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2], sys.argv[3]))
