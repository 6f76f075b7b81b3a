"""Configuration of the logging service (env prefix ``SHIPYARD_``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from shipyard_core.bus import LOGS_MAX_AGE_SECONDS, METRICS_MAX_AGE_SECONDS
from shipyard_core.settings import CommonSettings


class LoggingSettings(CommonSettings):
    """Settings of the logging service; the shared ones are documented on CommonSettings."""

    service_name: str = "logging"
    """Name of this service: ``logging``. Also its schema in PostgreSQL."""

    grpc_port: int = Field(default=50056, ge=0, le=65535)
    """Port of the LogService gRPC API (``SHIPYARD_GRPC_PORT``); 0 lets the OS choose."""

    logs_retention_seconds: float = Field(default=LOGS_MAX_AGE_SECONDS, gt=0)
    """How long log lines are kept (default 3 days): the ``MaxAge`` of the ``LOGS``
    stream and the age past which day partitions of ``logging.lines`` are dropped (a
    partition goes once its whole day is older, so lines live up to one day longer)."""

    metrics_retention_seconds: float = Field(default=METRICS_MAX_AGE_SECONDS, gt=0)
    """How long per-minute request metrics are kept (default 3 days, as the ``METRICS``
    stream); whole days are dropped once older."""

    retention_interval_seconds: float = Field(default=600.0, gt=0)
    """How often the ingesters drop expired partitions (logs and metrics)."""

    ingest_batch_size: int = Field(default=256, ge=1, le=4096)
    """Most LOGS messages the ingester writes in one transaction."""

    ingest_ack_wait_seconds: float = Field(default=10.0, gt=0)
    """``ack_wait`` of the ``LOGS`` consumer (set when it is created): how long batches a
    dead ingester had fetched stay invisible before they are delivered again."""

    gap_wait_seconds: float = Field(default=15.0, gt=0)
    """A batch that starts after the position stored for its source (its predecessor is
    still on its way) waits up to this long before the gap is accepted as lost (e.g. the
    predecessor expired from the stream while the service was down). Must be longer than
    ``ingest_ack_wait_seconds``: after a crash the predecessor may come back only then."""

    follow_poll_seconds: float = Field(default=0.25, gt=0)
    """How often a follow (``shipyard deploy logs --follow``) looks for new lines."""

    @model_validator(mode="after")
    def _gap_outlasts_redelivery(self) -> LoggingSettings:
        if self.gap_wait_seconds <= self.ingest_ack_wait_seconds:
            raise ValueError(
                "gap_wait_seconds must be longer than ingest_ack_wait_seconds (a batch a "
                "crashed ingester had fetched comes back only after the ack wait)"
            )
        return self

    database_pool_size: int = Field(default=10, ge=1)
    """Most PostgreSQL connections the service's pool opens (queries and follows)."""
