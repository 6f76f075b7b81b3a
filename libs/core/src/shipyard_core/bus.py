"""NATS JetStream: connection and the streams Shipyard's events travel on."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

log = logging.getLogger(__name__)

EVENTS_STREAM = "EVENTS"
DLQ_STREAM = "DLQ"
METRICS_STREAM = "METRICS"
METRICS_MAX_AGE_SECONDS = 3 * 24 * 3600.0
"""Gateway request metrics are kept 3 days (as their projection)."""
# Long enough to cover a relay that crashes after publishing and restarts; beyond it,
# consumers still dedupe by (stream, version).
DUPLICATE_WINDOW_SECONDS = 600.0


async def connect(url: str, name: str) -> NATS:
    """A NATS connection that keeps reconnecting forever (services outlive broker restarts)."""
    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
    )


def stream_configs() -> list[StreamConfig]:
    """The durable streams every deployment of Shipyard has (see infra/jetstream)."""
    return [
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=["events.>"],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            allow_direct=True,
            description="Domain events of every Shipyard service (the store is PostgreSQL).",
        ),
        StreamConfig(
            name=DLQ_STREAM,
            subjects=["dlq.>"],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            description="Messages a consumer gave up on after its bounded deliveries.",
        ),
        StreamConfig(
            name=METRICS_STREAM,
            subjects=["metrics.>"],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_age=METRICS_MAX_AGE_SECONDS,
            duplicate_window=120.0,
            description="Per-deployment request metrics, aggregated by each gateway.",
        ),
    ]


async def ensure_streams(js: JetStreamContext) -> None:
    """Creates (or updates) the streams; safe for several services to race on."""
    for config in stream_configs():
        try:
            await js.stream_info(config.name or "")
            await js.update_stream(config)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError:
                # Another service created it between our lookup and our create.
                await js.update_stream(config)
