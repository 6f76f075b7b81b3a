"""The ``async_requests`` read model: one row per request, for the list queries and the
sweeper (which requests passed their retention)."""

from __future__ import annotations

from collections.abc import Iterable

from shipyard_core.eventstore import StoredEvent
from shipyard_core.projections import Projection, Statement

SCHEMA = "asyncinference"


class AsyncRequestsProjection(Projection):
    """Rows of ``asyncinference.async_requests``."""

    name = "async_requests"
    schema = SCHEMA
    sources = ((SCHEMA, "async_request"),)
    tables = {
        "async_requests": (
            "request_id text PRIMARY KEY, deployment text NOT NULL, group_name text NOT NULL, "
            "caller text NOT NULL, protocol text NOT NULL, model_path text NOT NULL, "
            "content_type text NOT NULL, status text NOT NULL, attempts int NOT NULL, "
            "max_attempts int NOT NULL, error text NOT NULL DEFAULT '', "
            "payload_bytes bigint NOT NULL, result_bytes bigint NOT NULL DEFAULT 0, "
            "result_status int NOT NULL DEFAULT 0, "
            "result_content_type text NOT NULL DEFAULT '', "
            "created_at timestamptz NOT NULL, started_at timestamptz, "
            "finished_at timestamptz, expires_at timestamptz NOT NULL, "
            "expired bool NOT NULL DEFAULT false"
        ),
    }
    indexes = (
        ("async_requests", "deployment, created_at"),
        ("async_requests", "expires_at"),
    )

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        """The row change of one event."""
        p = event.payload
        rid = event.aggregate_id
        kind = event.event_type
        if kind == "AsyncRequestQueued":
            yield Statement(
                "INSERT INTO {async_requests} (request_id, deployment, group_name, caller, "
                "protocol, model_path, content_type, status, attempts, max_attempts, "
                "payload_bytes, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, "
                "'queued', 0, $8, $9, $10::text::timestamptz, $11::text::timestamptz)",
                (
                    rid,
                    p["deployment"],
                    p["group"],
                    p["caller"],
                    p["protocol"],
                    p["model_path"],
                    p["content_type"],
                    int(p["max_attempts"]),
                    int(p["payload_bytes"]),
                    p["at"],
                    p["expires_at"],
                ),
            )
        elif kind == "AsyncRequestStarted":
            yield Statement(
                "UPDATE {async_requests} SET status = 'running', attempts = $2, "
                "started_at = $3::text::timestamptz WHERE request_id = $1",
                (rid, int(p["attempt"]), p["at"]),
            )
        elif kind == "AsyncRequestAttemptFailed":
            yield Statement(
                "UPDATE {async_requests} SET status = 'queued', error = $2 WHERE request_id = $1",
                (rid, p["error"]),
            )
        elif kind == "AsyncRequestCompleted":
            yield Statement(
                "UPDATE {async_requests} SET status = 'completed', error = '', "
                "result_status = $2, result_content_type = $3, result_bytes = $4, "
                "finished_at = $5::text::timestamptz WHERE request_id = $1",
                (rid, int(p["status"]), p["content_type"], int(p["result_bytes"]), p["at"]),
            )
        elif kind == "AsyncRequestFailed":
            yield Statement(
                "UPDATE {async_requests} SET status = 'failed', error = $2, "
                "finished_at = $3::text::timestamptz WHERE request_id = $1",
                (rid, p["error"], p["at"]),
            )
        elif kind == "AsyncRequestCancelled":
            yield Statement(
                "UPDATE {async_requests} SET status = 'cancelled', "
                "finished_at = $2::text::timestamptz WHERE request_id = $1",
                (rid, p["at"]),
            )
        elif kind == "AsyncRequestExpired":
            yield Statement(
                "UPDATE {async_requests} SET expired = true WHERE request_id = $1", (rid,)
            )
