"""Queries: one request's status (from its events: always current, also right after
Submit answered), its result, and a deployment's requests (the ``async_requests``
projection)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from shipyard_asyncinference.app.commands import AsyncCommands
from shipyard_asyncinference.app.payloads import RESULT
from shipyard_asyncinference.app.views import RequestView, ResultView
from shipyard_asyncinference.domain import COMPLETED, STATUSES
from shipyard_asyncinference.projections import SCHEMA
from shipyard_core.auth import Principal
from shipyard_core.errors import FailedPrecondition, InvalidArgument

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class AsyncQueries:
    """The read side of async requests."""

    def __init__(self, commands: AsyncCommands) -> None:
        self.commands = commands
        self.pool = commands.pool
        self.blobs = commands.blobs

    async def get(self, caller: Principal, deployment: str, request_id: str) -> RequestView:
        """One request's status (NotFound unless the caller may see it)."""
        return RequestView.of(await self.commands.visible(caller, deployment, request_id))

    async def result(self, caller: Principal, deployment: str, request_id: str) -> ResultView:
        """A completed request's result; FailedPrecondition before that, or once it was
        removed."""
        agg = await self.commands.visible(caller, deployment, request_id)
        if agg.expired:
            raise FailedPrecondition(
                f"async request {request_id} expired: its payload and result were removed "
                f"at the end of the retention period ({agg.expires_at:%Y-%m-%dT%H:%M:%SZ})"
            )
        if agg.status != COMPLETED:
            detail = f": {agg.error}" if agg.error else ""
            raise FailedPrecondition(
                f"async request {request_id} is {agg.status}{detail}; a result exists once "
                "it is completed"
            )
        async with self.pool.acquire() as conn:
            body = await self.blobs.read(conn, agg.id, RESULT, agg.result_location)
        return ResultView(agg.id, agg.result_status, agg.result_content_type, body)

    async def search(
        self,
        caller: Principal,
        deployment: str,
        *,
        status: str = "",
        since: datetime | None = None,
        limit: int = 0,
    ) -> list[RequestView]:
        """A deployment's requests the caller may see, newest first."""
        if status and status not in STATUSES:
            raise InvalidArgument("status", f"{status[:40]!r} is not a status", "|".join(STATUSES))
        if limit < 0 or limit > MAX_LIMIT:
            raise InvalidArgument("limit", f"{limit} is out of range", f"1 to {MAX_LIMIT}")
        conditions = ["deployment = $1"]
        args: list[Any] = [deployment]
        if not (caller.internal or caller.admin):
            args.append(sorted(caller.groups))
            conditions.append(f"group_name = ANY(${len(args)}::text[])")
        if status:
            args.append(status)
            conditions.append(f"status = ${len(args)}")
        if since is not None:
            args.append(since)
            conditions.append(f"created_at >= ${len(args)}")
        args.append(limit or DEFAULT_LIMIT)
        sql = (
            f"SELECT * FROM {SCHEMA}.async_requests WHERE {' AND '.join(conditions)} "
            f"ORDER BY created_at DESC, request_id LIMIT ${len(args)}"
        )
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(sql, *args)
        return [RequestView.of_row(r) for r in rows]

    async def waiting_since(
        self, before: datetime, after: tuple[datetime, str] | None = None, limit: int = 200
    ) -> list[tuple[datetime, str, str]]:
        """``(since, request id, deployment)`` of requests queued, or running, since before
        ``before`` (candidates for a lost queue message), in ``(since, id)`` order after the
        cursor ``after``."""
        since = "coalesce(started_at, created_at)"
        cursor_ts, cursor_id = after or (datetime.min.replace(tzinfo=UTC), "")
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {since} AS since, request_id, deployment "
                f"FROM {SCHEMA}.async_requests WHERE status IN ('queued', 'running') "
                f"AND {since} <= $1 AND ({since}, request_id) > ($2, $3) "
                f"ORDER BY {since}, request_id LIMIT $4",
                before,
                cursor_ts,
                cursor_id,
                limit,
            )
        return [(r["since"], r["request_id"], r["deployment"]) for r in rows]

    async def due_for_expiry(self, now: datetime, limit: int = 500) -> list[str]:
        """Ids of requests past their retention, not yet expired."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT request_id FROM {SCHEMA}.async_requests "
                "WHERE expires_at <= $1 AND NOT expired ORDER BY expires_at LIMIT $2",
                now,
                limit,
            )
        return [r["request_id"] for r in rows]
