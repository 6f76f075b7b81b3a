"""Runs the async inference service: ``python -m shipyard_asyncinference``.

One process serves the gRPC API (``AsyncInferenceService``: Submit for the gateway;
status, result, list, cancel), and runs in the background the outbox relay (which also
puts accepted requests on the ``ASYNC`` work queue), the ``async_requests`` projection,
``worker_concurrency`` workers and the retention sweeper. Any number of replicas
may run: they share the work queue.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from shipyard.asyncinference.v1 import asyncinference_pb2_grpc
from shipyard_asyncinference.adapters import queue
from shipyard_asyncinference.adapters.gateway import GatewayRunner
from shipyard_asyncinference.api import AsyncInferenceServicer
from shipyard_asyncinference.app import (
    AsyncCommands,
    AsyncQueries,
    Blobs,
    Sweeper,
    Worker,
    ensure_blobs_table,
)
from shipyard_asyncinference.app.batch import (
    BatchCommands,
    BatchRunner,
    Locations,
    ensure_batch_tables,
)
from shipyard_asyncinference.app.membership import ensure_membership_table
from shipyard_asyncinference.projections import (
    SCHEMA,
    AsyncRequestsProjection,
    BatchJobsProjection,
)
from shipyard_asyncinference.settings import AsyncInferenceSettings
from shipyard_core.auth import Authenticator
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.logs import configure_logging
from shipyard_core.objectstore import open_store
from shipyard_core.service import EventSourcedService
from shipyard_core.telemetry import configure_tracing

__all__ = ["AsyncInference", "build", "main", "serve"]


@dataclass
class AsyncInference:
    """The assembled service (tests reach into its parts)."""

    host: ServiceHost
    service: EventSourcedService
    commands: AsyncCommands
    queries: AsyncQueries
    worker: Worker | None
    sweeper: Sweeper
    batches: BatchCommands
    batch_runner: BatchRunner | None


async def build(
    settings: AsyncInferenceSettings, authenticator: Authenticator | None = None
) -> AsyncInference:
    """The service, ready to start (tests pass port 0 and a StaticAuthenticator wrapped
    in an InternalTokenAuthenticator)."""
    svc = EventSourcedService(
        settings,
        SCHEMA,
        [AsyncRequestsProjection(), BatchJobsProjection()],
        pool_size=settings.database_pool_size,
    )
    await svc.open()
    async with svc.pool.acquire() as conn:
        await ensure_blobs_table(conn, SCHEMA)
        await ensure_membership_table(conn, SCHEMA)
        await ensure_batch_tables(conn)
    await queue.ensure_queue(svc.js, settings.ack_wait_seconds)
    blobs = Blobs(
        SCHEMA,
        open_store(settings.object_store or f"file://{settings.data_dir / 'objects'}"),
        settings.inline_max_bytes,
    )
    commands = AsyncCommands(
        svc.store,
        blobs,
        svc.js,
        max_payload_bytes=settings.max_payload_bytes,
        max_attempts=settings.max_attempts,
        retention_seconds=settings.retention_seconds,
    )
    queries = AsyncQueries(commands)
    buckets = {b.strip() for b in settings.batch_s3_buckets.split(",") if b.strip()}
    batches = BatchCommands(
        svc.store,
        Locations(
            Path(settings.batch_file_root or settings.data_dir / "batch"), frozenset(buckets)
        ),
    )
    host = ServiceHost(
        settings,
        authenticator=authenticator,  # None: the identity service, with the internal token
        # Submit carries whole payloads (the gateway's body limit, plus the envelope).
        options=[
            ("grpc.max_receive_message_length", settings.max_payload_bytes + 64 * 1024),
            ("grpc.max_send_message_length", settings.max_payload_bytes + 64 * 1024),
        ],
    )
    host.add_servicer(
        asyncinference_pb2_grpc.add_AsyncInferenceServiceServicer_to_server,
        AsyncInferenceServicer(commands, queries, batches),
    )
    await queue.retire_dispatcher(svc.js)
    runner = GatewayRunner(
        settings.gateway_url, settings.internal_token, settings.run_timeout_seconds
    )
    host.add_close_hook(runner.close)
    worker: Worker | None = None
    if settings.worker_concurrency > 0:
        worker = Worker(
            commands,
            svc.js,
            runner,
            concurrency=settings.worker_concurrency,
            call_budget_seconds=min(2.0, settings.run_timeout_seconds / 10),
            ack_wait_seconds=settings.ack_wait_seconds,
            retry_delay_seconds=settings.retry_delay_seconds,
        )
        host.add_background("async-worker", worker.run)
    batch_runner: BatchRunner | None = None
    if settings.batch_concurrency > 0:
        batch_runner = BatchRunner(
            batches,
            runner,
            settings.database_url,
            concurrency=settings.batch_concurrency,
            max_attempts=settings.max_attempts,
            retry_delay_seconds=settings.retry_delay_seconds,
        )
        host.add_background("batch-runner", batch_runner.run)
    sweeper = Sweeper(
        commands,
        queries,
        settings.sweep_interval_seconds,
        svc.js,
        redispatch_after=settings.redispatch_after_seconds,
    )
    host.add_background("async-sweeper", sweeper.run)
    svc.attach(host)
    return AsyncInference(host, svc, commands, queries, worker, sweeper, batches, batch_runner)


async def serve(settings: AsyncInferenceSettings) -> int:
    """Runs until SIGTERM; returns the exit code."""
    configure_tracing(settings.service_name, settings.otlp_endpoint)
    service = await build(settings)
    return await service.host.run()


def main() -> None:
    """Console entry point; exits with the process's status."""
    settings = AsyncInferenceSettings()
    configure_logging(settings)
    raise SystemExit(asyncio.run(serve(settings)))
