"""Configuration of the async inference service (env prefix ``SHIPYARD_``)."""

from __future__ import annotations

from pydantic import Field

from shipyard_core.settings import CommonSettings


class AsyncInferenceSettings(CommonSettings):
    """Settings of the async inference service; the shared ones are documented on
    CommonSettings."""

    service_name: str = "asyncinference"
    """Name of this service: ``asyncinference``. Also its schema in PostgreSQL."""

    grpc_port: int = Field(default=50055, ge=0, le=65535)
    """Port the gRPC server binds to (``SHIPYARD_GRPC_PORT``); 0 lets the OS choose."""

    gateway_url: str = "http://127.0.0.1:8080"
    """Base URL of the gateway's REST data plane (``SHIPYARD_GATEWAY_URL``): workers run
    each request through it (``POST /deployments/{d}/async/{id}/run`` with the internal
    token), so routing, wake-up from zero and balancing are the gateway's, as for
    synchronous requests."""

    object_store: str = ""
    """Where payloads and results larger than ``inline_max_bytes`` go
    (``SHIPYARD_OBJECT_STORE``: ``file:///path`` or ``s3://bucket[/prefix]``). Empty:
    ``file://<data_dir>/objects``."""

    inline_max_bytes: int = Field(default=64 * 1024, ge=0)
    """Payloads and results up to this size are kept in PostgreSQL (table
    ``asyncinference.blobs``); larger ones in the object store."""

    max_payload_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    """Largest payload an async request may carry (default 32 MiB, the gateway's own
    body limit); a larger one is refused (HTTP 413) before anything is stored."""

    max_attempts: int = Field(default=3, ge=1)
    """How many times a request is started at most. An attempt fails when the model
    answers 5xx, the gateway cannot reach it (502/503/504, 429) or the worker running it
    dies; after the last one the request ends ``failed`` with the last error. A 4xx
    answer of the model is final at once (retrying the same input cannot help)."""

    retry_delay_seconds: float = Field(default=1.0, ge=0)
    """Delay before a failed attempt is retried; doubled for each further attempt."""

    ack_wait_seconds: float = Field(default=30.0, gt=0)
    """A request whose worker stops reporting progress for this long (it died: kill -9,
    a lost node) is redelivered to another worker. Running workers report every third of
    it, so a long prediction is never redelivered while it runs."""

    worker_concurrency: int = Field(default=8, ge=0)
    """Model calls one process runs at once (each carries requests of one lot: up to
    64, fewer for a slow model, see ``run_timeout_seconds``). 0 runs no worker (an
    API-only replica); every replica's workers share the one work queue."""

    run_timeout_seconds: float = Field(default=300.0, gt=0)
    """How long a worker waits for the gateway's answer to one model call (waking a
    deployment scaled to zero included) before its attempts fail. A call carries as
    many requests as the model answers in 2 s (or a tenth of this, if less; measured
    per deployment); a call that fails as a whole is tried again one request at a
    time."""

    retention_seconds: float = Field(default=3 * 24 * 3600.0, gt=0)
    """How long a request's payload and result are kept after it was submitted (default
    3 days). Then the sweeper removes them (event ``AsyncRequestExpired``); the status
    stays, saying ``expired``."""

    sweep_interval_seconds: float = Field(default=60.0, gt=0)
    """How often the sweeper looks for requests past their retention, and for queued
    requests whose queue message is lost."""

    redispatch_after_seconds: float = Field(default=300.0, gt=0)
    """A request queued this long whose message is no longer in the ``ASYNC`` stream is
    put on the queue again (the stream lost it)."""

    database_pool_size: int = Field(default=10, ge=1)
    """Most PostgreSQL connections the service's pool opens."""

    batch_concurrency: int = Field(default=4, ge=0)
    """Objects of a batch job one process works on at once (each one prediction at a
    time). 0 runs no batch jobs in this process."""

    batch_file_root: str = ""
    """Folder under which ``file://`` batch inputs and outputs must be (so a job cannot
    read the service's own files). Empty: ``<data_dir>/batch``."""

    batch_s3_buckets: str = ""
    """Comma-separated S3 buckets batch jobs may read and write with the service's
    credentials (``*``: any). Empty: none, only ``file://`` locations."""
