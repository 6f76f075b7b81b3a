"""The ``async_requests`` read model: one row per request, for the list queries and the
sweeper (which requests passed their retention). A lot's events change their requests'
rows in one statement each (decision 0035)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from shipyard_asyncinference.domain.lots import REQUEST_EVENT_OF
from shipyard_core.eventstore import StoredEvent
from shipyard_core.projections import Projection, Statement

SCHEMA = "asyncinference"


class AsyncRequestsProjection(Projection):
    """Rows of ``asyncinference.async_requests``."""

    name = "async_requests"
    schema = SCHEMA
    sources = ((SCHEMA, "async_lot"), (SCHEMA, "async_request"))
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
        """The row changes of one event."""
        kind = event.event_type
        items = event.payload.get("requests", [])
        if kind == "AsyncLotQueued":
            yield Statement(
                "INSERT INTO {async_requests} (request_id, deployment, group_name, caller, "
                "protocol, model_path, content_type, status, attempts, max_attempts, "
                "payload_bytes, created_at, expires_at) SELECT u.id, u.d, u.g, u.c, u.p, "
                "u.mp, u.ct, 'queued', 0, u.ma, u.pb, u.at, u.ex FROM unnest($1::text[], "
                "$2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], "
                "$8::int[], $9::bigint[], $10::text[]::timestamptz[], "
                "$11::text[]::timestamptz[]) AS u(id, d, g, c, p, mp, ct, ma, pb, at, ex)",
                _columns(
                    items,
                    ("request_id", "deployment", "group", "caller", "protocol", "model_path"),
                    ("content_type", "max_attempts", "payload_bytes", "at", "expires_at"),
                ),
            )
        elif kind == "AsyncLotStarted":
            yield Statement(
                "UPDATE {async_requests} AS t SET status = 'running', attempts = u.attempt, "
                "started_at = u.at FROM unnest($1::text[], $2::int[], "
                "$3::text[]::timestamptz[]) AS u(id, attempt, at) WHERE t.request_id = u.id",
                _columns(items, ("request_id", "attempt", "at")),
            )
        elif kind == "AsyncLotCompleted":
            yield Statement(
                "UPDATE {async_requests} AS t SET status = 'completed', error = '', "
                "result_status = u.status, result_content_type = u.content_type, "
                "result_bytes = u.result_bytes, finished_at = u.at FROM unnest($1::text[], "
                "$2::int[], $3::text[], $4::bigint[], $5::text[]::timestamptz[]) "
                "AS u(id, status, content_type, result_bytes, at) WHERE t.request_id = u.id",
                _columns(items, ("request_id", "status", "content_type", "result_bytes", "at")),
            )
        elif kind in REQUEST_EVENT_OF:
            for item in items:  # rare: a row at a time
                yield from self._request(REQUEST_EVENT_OF[kind], item["request_id"], item)
        else:
            yield from self._request(kind, event.aggregate_id, event.payload)

    def _request(self, kind: str, rid: str, p: dict[str, Any]) -> Iterable[Statement]:
        """The row change of one request's event."""
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


def _columns(items: Sequence[dict[str, Any]], *groups: Sequence[str]) -> tuple[Any, ...]:
    """The items' fields as one array each (for ``unnest``), in the order named."""
    return tuple([item[name] for item in items] for group in groups for name in group)
