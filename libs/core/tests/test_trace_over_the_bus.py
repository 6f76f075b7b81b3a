"""One trace from a command, through the outbox and JetStream, into a projection."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shipyard_core import bus, db
from shipyard_core.eventstore import EventStore, ensure_schema
from shipyard_core.metadata import current_metadata
from shipyard_core.outbox import OutboxRelay
from shipyard_core.projections import ProjectionRunner
from shipyard_core.telemetry import configure_tracing, tracer
from shipyard_testing import wait_for
from shipyard_testing.sample import SERVICE, CounterProjection, thing


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    configure_tracing("bus-test", None).add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_trace_context_travels_in_nats_headers_to_the_projection(
    database_url: str, nats_url: str, spans: InMemorySpanExporter
) -> None:
    pool = await db.create_pool(database_url)
    async with pool.acquire() as conn:
        await ensure_schema(conn, SERVICE)
    nc = await bus.connect(nats_url, "trace-test")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    store = EventStore(pool, SERVICE)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(OutboxRelay(database_url, js, SERVICE).run(stop)),
        asyncio.create_task(ProjectionRunner(CounterProjection(), database_url, js).run(stop)),
    ]
    try:
        with tracer("test").start_as_current_span("command") as command:
            trace_id = command.get_span_context().trace_id
            event = thing("t", 3)
            event = type(event)(**{**event.__dict__, "metadata": current_metadata()})
            await store.append([event], expected_version=0)
        assert event.metadata["traceparent"].split("-")[1] == f"{trace_id:032x}"

        msg = await wait_for(
            lambda: _last(js),
            timeout=20,
            message="not relayed",
        )
        assert msg.headers["traceparent"] == event.metadata["traceparent"]
        assert msg.headers["Nats-Msg-Id"] == str(event.event_id)

        def consumer_span() -> object:
            for span in spans.get_finished_spans():
                if span.name == "project counters" and any(
                    link.context.trace_id == trace_id for link in span.links
                ):
                    return span
            return None

        span = await wait_for(consumer_span, timeout=20, message="no linked consumer span")
        assert span.kind == trace.SpanKind.CONSUMER  # type: ignore[attr-defined]
    finally:
        stop.set()
        for t in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(t, 10)
        await nc.close()
        await pool.close()


async def _last(js: object) -> object:
    from nats.js.errors import NotFoundError

    try:
        return await js.get_last_msg(bus.EVENTS_STREAM, f"events.{SERVICE}.thing.t")  # type: ignore[attr-defined]
    except NotFoundError:
        return None
