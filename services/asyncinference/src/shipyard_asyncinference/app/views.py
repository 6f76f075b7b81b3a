"""What queries and commands answer: a request's status, and a result."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shipyard_asyncinference.domain import AsyncRequest


@dataclass(frozen=True)
class RequestView:
    """One async request as callers see it (never its payload)."""

    request_id: str
    deployment: str
    group: str
    caller: str
    status: str
    attempts: int
    error: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    expired: bool
    protocol: str
    model_path: str
    content_type: str
    payload_bytes: int
    result_bytes: int
    result_status: int

    @classmethod
    def of(cls, agg: AsyncRequest) -> RequestView:
        """The view of an aggregate."""
        return cls(
            request_id=agg.id,
            deployment=agg.deployment,
            group=agg.group,
            caller=agg.caller,
            status=agg.status,
            attempts=agg.attempts,
            error=agg.error,
            created_at=agg.created_at,
            started_at=agg.started_at,
            finished_at=agg.finished_at,
            expires_at=agg.expires_at,
            expired=agg.expired,
            protocol=agg.protocol,
            model_path=agg.model_path,
            content_type=agg.content_type,
            payload_bytes=agg.payload_bytes,
            result_bytes=agg.result_bytes,
            result_status=agg.result_status,
        )

    @classmethod
    def of_row(cls, row: Any) -> RequestView:
        """The view of an ``async_requests`` row."""
        return cls(
            request_id=row["request_id"],
            deployment=row["deployment"],
            group=row["group_name"],
            caller=row["caller"],
            status=row["status"],
            attempts=row["attempts"],
            error=row["error"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            expires_at=row["expires_at"],
            expired=row["expired"],
            protocol=row["protocol"],
            model_path=row["model_path"],
            content_type=row["content_type"],
            payload_bytes=row["payload_bytes"],
            result_bytes=row["result_bytes"],
            result_status=row["result_status"],
        )


@dataclass(frozen=True)
class ResultView:
    """A completed request's result: the model server's answer."""

    request_id: str
    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True)
class Submission:
    """What the gateway hands over for one async request."""

    deployment: str
    group: str
    caller: str
    model_path: str
    content_type: str
    body: bytes
    protocol: str
    client_request_id: str = ""
