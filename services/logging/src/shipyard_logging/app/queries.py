"""Reading logs: tail, follow, download and the list of sources, for the caller's groups.

Every query first resolves what the caller may read. Of a deployment: which of its
revisions (its lives in ``deployment_lives`` and their groups, :func:`visible_ranges`);
a deployment that is not the caller's answers NOT_FOUND, word for word as one that does
not exist. Of an image build: all of it or nothing, by the group its batches named
(``logging.sources``); a build that is not the caller's, or has no stored line, answers
NOT_FOUND as imagebuild words a build that does not exist. The same queries serve both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shipyard_core.aio import pause
from shipyard_core.auth import Principal
from shipyard_core.errors import InvalidArgument, NotFound
from shipyard_logging.adapters.store import LINES, SOURCES, build_owner
from shipyard_logging.domain import LogQuery, RevisionRange, visible_ranges
from shipyard_logging.projections import DeploymentLivesProjection

_LIVES = DeploymentLivesProjection.live_tables()["deployment_lives"]
_COLUMNS = 'seq, at, kind, deployment, revision, source, stream, "offset", text, cut'
PAGE = 1000
"""Lines per streamed batch."""


@dataclass(frozen=True)
class LineView:
    """One line as queries return it: of an instance, or of a build (``build`` set,
    ``deployment`` and ``instance`` empty, ``offset`` its line number)."""

    seq: int
    at: datetime
    deployment: str
    revision: int
    instance: str
    stream: str
    offset: int
    text: str
    cut: bool
    build: str = ""


@dataclass(frozen=True)
class SourceView:
    """One instance with stored lines."""

    instance: str
    revision: int
    lines: int
    first_at: datetime | None
    last_at: datetime | None


def deployment_not_found(deployment: str) -> NotFound:
    """The one answer for a deployment that does not exist or is not the caller's."""
    return NotFound(f"deployment {deployment!r} does not exist; see `shipyard deploy list`")


def build_not_found(build_id: str) -> NotFound:
    """The one answer for a build that does not exist, is not the caller's, or has no
    stored line: the words imagebuild uses for a build that does not exist."""
    return NotFound(f"build {build_id} does not exist; see `shipyard image builds`")


def _view(row: asyncpg.Record) -> LineView:
    build = row["kind"] == "build"
    return LineView(
        seq=row["seq"],
        at=row["at"],
        deployment=row["deployment"],
        revision=row["revision"],
        instance="" if build else row["source"],
        build=row["source"] if build else "",
        stream=row["stream"],
        offset=row["offset"],
        text=row["text"],
        cut=row["cut"],
    )


class _Where:
    """A WHERE clause built from checked values only (placeholders for every value)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.args: list[Any] = []

    def add(self, sql: str, *values: Any) -> None:
        for value in values:
            self.args.append(value)
            sql = sql.replace("?", f"${len(self.args)}", 1)
        self.parts.append(sql)

    @property
    def sql(self) -> str:
        return " AND ".join(self.parts) if self.parts else "true"

    def next_arg(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class LogQueries:
    """Log reads over the pool; every method takes the caller."""

    def __init__(self, pool: asyncpg.Pool, *, poll_seconds: float = 0.25) -> None:
        self.pool = pool
        self.poll_seconds = poll_seconds

    async def _scope(self, caller: Principal, query: LogQuery) -> list[RevisionRange] | None:
        """What of the query's lines the caller reads: the revisions of a deployment
        (None: all), or a whole build; NotFound when nothing."""
        if not query.build:
            return await self._ranges(caller, query.deployment)
        if not caller.admin:
            async with self.pool.acquire() as conn:
                owner = await build_owner(conn, query.build)
            # A build whose batches named no group (the format before it) is the admins'.
            if not owner or not caller.can_see(owner):
                raise build_not_found(query.build)
        return None

    async def _ranges(self, caller: Principal, deployment: str) -> list[RevisionRange] | None:
        """The revisions the caller reads (None: all); NotFound when none."""
        rows = await self.pool.fetch(
            f"SELECT first_revision, group_name FROM {_LIVES} WHERE name = $1 "
            "ORDER BY first_revision",
            deployment,
        )
        ranges = visible_ranges(caller, [(r["first_revision"], r["group_name"]) for r in rows])
        if ranges is not None and not ranges:
            raise deployment_not_found(deployment)
        return ranges

    def _where(self, query: LogQuery, ranges: Sequence[RevisionRange] | None) -> _Where:
        where = _Where()
        # A build's lines have no deployment: (deployment, seq) serves their follow too.
        where.add("deployment = ?", query.deployment)
        if query.build:
            where.add("kind = 'build'")
            where.add("source = ?", query.build)
        else:
            where.add("kind = 'instance'")
        if query.instance:
            where.add("source = ?", query.instance)
        if query.since is not None:
            where.add("at >= ?", query.since)
        if query.until is not None:
            where.add("at < ?", query.until)
        if query.grep:
            where.add("text ILIKE ?", f"%{_escape_like(query.grep)}%")
        if ranges is not None:
            alternatives = []
            for r in ranges:
                first = where.next_arg(r.first)
                if r.end is None:
                    alternatives.append(f"revision >= {first}")
                else:
                    end = where.next_arg(r.end)
                    alternatives.append(f"(revision >= {first} AND revision < {end})")
            where.parts.append("(" + " OR ".join(alternatives) + ")")
        return where

    async def tail(self, caller: Principal, query: LogQuery, limit: int) -> list[LineView]:
        """The last ``limit`` lines, oldest first: of one instance or build in its order,
        of a deployment in the order they arrived."""
        ranges = await self._scope(caller, query)
        where = self._where(query, ranges)
        limit_arg = where.next_arg(limit)
        order = '"offset" DESC' if query.one_source else "seq DESC"
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM {LINES} WHERE {where.sql} ORDER BY {order} LIMIT {limit_arg}",
            *where.args,
        )
        return [_view(r) for r in reversed(rows)]

    async def follow(
        self, caller: Principal, query: LogQuery, tail: int, stop: asyncio.Event
    ) -> AsyncIterator[list[LineView]]:
        """The last ``tail`` lines, then every new line in arrival order, in batches,
        until ``stop`` is set or the caller goes away."""
        if query.until is not None:
            raise InvalidArgument("until", "cannot be used with follow", "leave it out")
        ranges = await self._scope(caller, query)
        cursor = 0
        if tail > 0:
            backlog = await self.tail(caller, query, tail)
            if backlog:
                cursor = max(line.seq for line in backlog)
                yield backlog
        if cursor == 0:
            cursor = int(
                await self.pool.fetchval(
                    f"SELECT coalesce(max(seq), 0) FROM {LINES} WHERE deployment = $1",
                    query.deployment,
                )
            )
        while not stop.is_set():
            where = self._where(query, ranges)
            where.add("seq > ?", cursor)
            limit_arg = where.next_arg(PAGE)
            rows = await self.pool.fetch(
                f"SELECT {_COLUMNS} FROM {LINES} WHERE {where.sql} ORDER BY seq LIMIT {limit_arg}",
                *where.args,
            )
            if rows:
                cursor = rows[-1]["seq"]
                yield [_view(r) for r in rows]
                if len(rows) == PAGE:
                    continue
            await pause(stop, self.poll_seconds)

    async def download(self, caller: Principal, query: LogQuery) -> AsyncIterator[list[LineView]]:
        """Every stored line of one instance or build (the query's other filters are
        not used), in order, in batches."""
        if not query.one_source:
            raise InvalidArgument(
                "instance", "is required to download a log", "see `shipyard deploy instances`"
            )
        ranges = await self._scope(caller, query)
        source = LogQuery(query.deployment, query.instance, build=query.build)
        after = -1
        found = False
        while True:
            where = self._where(source, ranges)
            where.add('"offset" > ?', after)
            limit_arg = where.next_arg(PAGE * 5)
            rows = await self.pool.fetch(
                f"SELECT {_COLUMNS} FROM {LINES} WHERE {where.sql} "
                f'ORDER BY "offset" LIMIT {limit_arg}',
                *where.args,
            )
            if not rows:
                break
            found = True
            after = rows[-1]["offset"]
            yield [_view(r) for r in rows]
        if not found and query.build:
            raise build_not_found(query.build)
        if not found:
            raise NotFound(
                f"instance {query.instance!r} of deployment {query.deployment!r} has no "
                f"stored log lines; see `shipyard deploy logs {query.deployment}`"
            )

    async def sources(self, caller: Principal, deployment: str) -> list[SourceView]:
        """The instances of the deployment that have stored lines, newest first."""
        ranges = await self._ranges(caller, deployment)
        rows = await self.pool.fetch(
            f"SELECT source, revision, lines, first_at, last_at FROM {SOURCES} "
            "WHERE deployment = $1 AND kind = 'instance' AND lines > 0 "
            "ORDER BY last_at DESC NULLS LAST, source",
            deployment,
        )
        views = [
            SourceView(r["source"], r["revision"], r["lines"], r["first_at"], r["last_at"])
            for r in rows
        ]
        if ranges is None:
            return views
        return [
            v
            for v in views
            if any(v.revision >= r.first and (r.end is None or v.revision < r.end) for r in ranges)
        ]
