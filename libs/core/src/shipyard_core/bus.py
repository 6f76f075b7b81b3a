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
LOGS_STREAM = "LOGS"
LOGS_MAX_AGE_SECONDS = 3 * 24 * 3600.0
"""Default retention of the ``LOGS`` stream: 3 days, like the logging service's tables.
The logging service sets its own (``SHIPYARD_LOG_RETENTION_SECONDS``); other services
calling :func:`ensure_streams` keep whatever ``MaxAge`` the stream already has."""
LOGS_DUPLICATE_WINDOW_SECONDS = 600.0
"""A log shipper killed after publishing re-sends its batch within this window at the
latest (it restarts with the scheduler); beyond it the logging service still drops lines
it has stored already (by source and offset)."""
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


def stream_configs(logs_max_age_seconds: float = LOGS_MAX_AGE_SECONDS) -> list[StreamConfig]:
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
        StreamConfig(
            name=LOGS_STREAM,
            subjects=["logs.>"],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_age=logs_max_age_seconds,
            duplicate_window=LOGS_DUPLICATE_WINDOW_SECONDS,
            description="Batches of log lines of instances and builds (see docs/events.md).",
        ),
    ]


async def ensure_streams(
    js: JetStreamContext, *, logs_max_age_seconds: float | None = None
) -> None:
    """Creates (or updates) the streams; safe for several services to race on.

    ``logs_max_age_seconds`` is the retention of ``LOGS``, which the logging service owns:
    it passes its setting; everyone else passes None, which creates ``LOGS`` with the
    default retention when missing and keeps the ``MaxAge`` of an existing one."""
    wanted = LOGS_MAX_AGE_SECONDS if logs_max_age_seconds is None else logs_max_age_seconds
    for config in stream_configs(wanted):
        try:
            info = await js.stream_info(config.name or "")
            if config.name == LOGS_STREAM and logs_max_age_seconds is None:
                config.max_age = info.config.max_age
            await js.update_stream(config)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError:
                # Another service created it between our lookup and our create.
                await js.update_stream(config)
