"""Batch jobs: commands, queries, and the runner that works through a job's objects.

Input formats, by the input object's extension:

- ``.json``: the object is one prediction's payload; the output is the model's answer.
- ``.jsonl`` / ``.ndjson``: one payload per non-empty line; the output holds one answer
  per line (JSON Lines), in order.
- ``.csv``: a header row, then one prediction per row, its payload ``{column: value}``
  (numbers as numbers); the output holds one answer per row (JSON Lines).

An object is a unit: when a prediction in it fails (after the retries a transient
failure gets) the object fails with the reason (``line N: ...``) and gets no output.
Outputs go to ``<output>/<key relative to the input prefix>.out``.

Running: every asyncinference process runs a :class:`BatchRunner`; a job is run by the
process holding its PostgreSQL advisory lock (a crashed runner's session ends, its lock
with it, and another runner resumes the job, skipping objects that have an outcome).
The input listing is taken once, stored with ``BatchJobListed`` (table
``asyncinference.batch_inputs``), so a resumed job works on the same objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from shipyard_asyncinference.adapters.gateway import GatewayRunner
from shipyard_asyncinference.domain import EVENTS, BatchJob
from shipyard_asyncinference.projections import SCHEMA
from shipyard_core import db
from shipyard_core.aggregate import Repository, retry_on_conflict
from shipyard_core.aio import pause
from shipyard_core.auth import Principal
from shipyard_core.db import Conn
from shipyard_core.errors import (
    ConcurrencyError,
    InvalidArgument,
    NotFound,
    ShipyardError,
)
from shipyard_core.eventstore import EventStore
from shipyard_core.objectstore import ObjectStore, open_store
from shipyard_core.validation import deployment_name

log = logging.getLogger(__name__)

RAW_PATH = "/predict"
MAX_FAILURES_SHOWN = 1000
_INFRA_ERRORS = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)

_DDL = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.batch_inputs (
    job_id text NOT NULL,
    key text NOT NULL,
    PRIMARY KEY (job_id, key)
)
"""


async def ensure_batch_tables(conn: Conn) -> None:
    """Creates ``asyncinference.batch_inputs`` if missing."""
    await conn.execute(_DDL)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Location:
    """Where a job reads or writes: a store and a key prefix in it."""

    url: str
    store: ObjectStore
    prefix: str
    base: str
    """``s3://bucket`` or ``file://<root>``: two locations with the same base share keys."""

    def key(self, relative: str) -> str:
        """The full key of ``relative``."""
        return f"{self.prefix}{relative}"


@dataclass(frozen=True)
class Locations:
    """Resolves and checks batch input and output URLs."""

    file_root: Path
    s3_buckets: frozenset[str]
    """Buckets jobs may use (``*``: any)."""
    s3_endpoint: str | None = None

    def resolve(self, url: str, what: str) -> Location:
        """The location of ``url`` (``s3://bucket/prefix/`` or ``file:///path/``);
        InvalidArgument for another form or a place jobs may not use."""
        parts = urlsplit(url)
        if parts.scheme == "s3":
            bucket = parts.netloc
            if "*" not in self.s3_buckets and bucket not in self.s3_buckets:
                raise InvalidArgument(
                    what,
                    f"bucket {bucket!r} is not open to batch jobs",
                    "ask an operator to add it to SHIPYARD_BATCH_S3_BUCKETS",
                )
            prefix = _prefix(unquote(parts.path))
            store = open_store(f"s3://{bucket}", endpoint_url=self.s3_endpoint)
            return Location(url, store, prefix, f"s3://{bucket}")
        if parts.scheme == "file":
            root = self.file_root.resolve()
            path = Path(unquote(parts.path)).resolve()
            if parts.netloc not in ("", "localhost") or not path.is_relative_to(root):
                raise InvalidArgument(
                    what,
                    f"{url!r} is not under the batch folder {root}",
                    f"put the files under file://{root}/",
                )
            root.mkdir(parents=True, exist_ok=True)
            relative = path.relative_to(root).as_posix()
            prefix = "" if relative == "." else _prefix(relative)
            return Location(url, open_store(f"file://{root}"), prefix, f"file://{root}")
        raise InvalidArgument(what, f"{url[:100]!r} is not a batch location", "s3://bucket/prefix/")


def _prefix(path: str) -> str:
    path = path.strip("/")
    return f"{path}/" if path else ""


@dataclass(frozen=True)
class BatchView:
    """A job as callers see it."""

    job_id: str
    deployment: str
    group: str
    caller: str
    input: str
    output: str
    status: str
    total: int
    done: int
    failed: int
    error: str
    created_at: datetime | None
    finished_at: datetime | None
    failures: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, job: BatchJob) -> BatchView:
        """The view of an aggregate, with its first failures."""
        return cls(
            job.id,
            job.deployment,
            job.group,
            job.caller,
            job.input,
            job.output,
            job.status,
            job.total,
            len(job.done),
            len(job.failures),
            job.error,
            job.created_at,
            job.finished_at,
            sorted(job.failures.items())[:MAX_FAILURES_SHOWN],
        )

    @classmethod
    def of_row(cls, row: Any) -> BatchView:
        """The view of a ``batch_jobs`` row (no failures)."""
        return cls(
            row["job_id"],
            row["deployment"],
            row["group_name"],
            row["caller"],
            row["input"],
            row["output"],
            row["status"],
            row["total"],
            row["done"],
            row["failed"],
            row["error"],
            row["created_at"],
            row["finished_at"],
        )


class BatchCommands:
    """Create, cancel, read batch jobs."""

    def __init__(
        self, store: EventStore, locations: Locations, clock: Callable[[], datetime] = _now
    ) -> None:
        self.store = store
        self.pool = store.pool
        self.repo: Repository[BatchJob] = Repository(store, BatchJob, EVENTS)
        self.locations = locations
        self.clock = clock

    async def create(
        self, caller: Principal, deployment: str, group: str, user: str, input: str, output: str
    ) -> BatchView:
        """Starts a job (the gateway's call, internal only)."""
        caller.require_internal("start a batch job (the gateway does)")
        deployment_name("deployment", deployment)
        source = self.locations.resolve(input, "input")
        target = self.locations.resolve(output, "output")
        if source.base == target.base and (
            target.prefix.startswith(source.prefix) or source.prefix.startswith(target.prefix)
        ):
            raise InvalidArgument(
                "output",
                "overlaps the input prefix",
                "write outputs outside the input, e.g. s3://bucket/out/ for s3://bucket/in/",
            )
        job = BatchJob(uuid.uuid4().hex)
        job.create(
            deployment=deployment,
            group=group,
            caller=user,
            input=input,
            output=output,
            at=self.clock(),
        )
        await self.repo.save(job, actor=user or "anonymous")
        return BatchView.of(job)

    async def visible(self, caller: Principal, deployment: str, job_id: str) -> BatchJob:
        """The job if the caller may see it, else NotFound."""
        job = None
        if len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id):
            job = await self.repo.load(job_id)
        if (
            job is None
            or not job.exists
            or job.deployment != deployment
            or not (caller.internal or caller.can_see(job.group))
        ):
            raise NotFound(f"batch job {job_id[:64]!r} of deployment {deployment!r} does not exist")
        return job

    async def get(self, caller: Principal, deployment: str, job_id: str) -> BatchView:
        """One job with its progress and failures."""
        return BatchView.of(await self.visible(caller, deployment, job_id))

    async def cancel(self, caller: Principal, deployment: str, job_id: str) -> BatchView:
        """Cancels a job that has not ended."""

        async def attempt() -> BatchView:
            job = await self.visible(caller, deployment, job_id)
            job.cancel(caller.user, self.clock())
            await self.repo.save(job, actor=caller.user)
            return BatchView.of(job)

        return await retry_on_conflict(attempt)

    async def search(self, caller: Principal, deployment: str, limit: int = 0) -> list[BatchView]:
        """A deployment's jobs the caller may see, newest first."""
        if limit < 0 or limit > 1000:
            raise InvalidArgument("limit", f"{limit} is out of range", "1 to 1000")
        args: list[Any] = [deployment, limit or 100]
        where = "deployment = $1"
        if not (caller.internal or caller.admin):
            args.append(sorted(caller.groups))
            where += " AND group_name = ANY($3::text[])"
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT * FROM {SCHEMA}.batch_jobs WHERE {where} "
                "ORDER BY created_at DESC, job_id LIMIT $2",
                *args,
            )
        return [BatchView.of_row(r) for r in rows]


# --- formats --------------------------------------------------------------------------


def _cell(value: str) -> Any:
    for parse in (int, float):
        try:
            return parse(value)
        except ValueError:
            continue
    return value


def payloads(key: str, data: bytes) -> tuple[list[bytes], bool]:
    """The prediction payloads of one input object, and whether its output is JSON Lines
    (one answer per payload) rather than the single answer. ``ValueError`` with the
    reason for an object that cannot be read."""
    lower = key.lower()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if lower.endswith(".json"):
        try:
            json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
        return [data], False
    if lower.endswith((".jsonl", ".ndjson")):
        out = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError as exc:
                raise ValueError(f"line {number}: not valid JSON: {exc}") from None
            out.append(line.encode())
        return out, True
    if lower.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        rows = []
        for row in reader:
            if None in row:
                raise ValueError(f"line {reader.line_num}: more cells than columns")
            rows.append(json.dumps({k: _cell(v) for k, v in row.items()}).encode())
        return rows, True
    raise ValueError("unsupported input format: use .json, .jsonl (or .ndjson) or .csv")


def _answer_line(body: bytes) -> bytes:
    try:
        return json.dumps(json.loads(body), separators=(",", ":")).encode()
    except ValueError:
        return json.dumps(body.decode("utf-8", errors="replace")).encode()


# --- the runner -----------------------------------------------------------------------


class _Cancelled(Exception):
    """The job ended under the runner (cancelled)."""


class BatchRunner:
    """Claims jobs and works through their objects, ``concurrency`` at a time."""

    def __init__(
        self,
        commands: BatchCommands,
        gateway: GatewayRunner,
        dsn: str,
        *,
        concurrency: int,
        max_attempts: int,
        retry_delay_seconds: float,
        poll_interval: float = 1.0,
        name: str = "",
    ) -> None:
        self.commands = commands
        self.gateway = gateway
        self.dsn = dsn
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay_seconds
        self.poll_interval = poll_interval
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.objects_done = 0
        """Objects this runner recorded an outcome for (tests watch it)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Runs jobs until ``stop`` is set."""
        while not stop.is_set():
            try:
                if not await self._run_one(stop):
                    await pause(stop, self.poll_interval)
            except _INFRA_ERRORS as exc:
                log.warning("batch runner lost a connection: %s", exc)
                await pause(stop, 1.0)
            except Exception:
                log.exception("batch runner failed; retrying")
                await pause(stop, 1.0)

    async def _run_one(self, stop: asyncio.Event) -> bool:
        """Runs one claimable job; False when there was none."""
        async with self.commands.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT job_id FROM {SCHEMA}.batch_jobs WHERE status IN ('pending', 'running') "
                "ORDER BY created_at LIMIT 50"
            )
        if not rows:
            return False
        lock = await db.connect(self.dsn)
        try:
            for row in rows:
                key = f"shipyard.batch.{row['job_id']}"
                if await lock.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
                    try:
                        await self.run_job(row["job_id"], stop)
                    finally:
                        await lock.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
                    return True
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(lock.close(), 2)
        return False

    async def run_job(self, job_id: str, stop: asyncio.Event) -> None:
        """Works through one job (the caller holds its lock)."""
        repo = self.commands.repo
        job = await repo.load(job_id)
        if not job.exists or job.ended:
            return
        try:
            source = self.commands.locations.resolve(job.input, "input")
            target = self.commands.locations.resolve(job.output, "output")
            keys = await self._listing(job, source)
        except (ShipyardError, OSError) as exc:
            job = await repo.load(job_id)
            job.fail(f"cannot list the input: {_reason(exc)}", _now())
            with contextlib.suppress(ConcurrencyError):
                await repo.save(job, actor=self.name)
            return
        except _Cancelled:
            return
        state = _JobState(job)
        todo = [k for k in keys if not job.handled(k)]
        queue: asyncio.Queue[str] = asyncio.Queue()
        for k in todo:
            queue.put_nowait(k)

        async def work() -> None:
            while not stop.is_set() and not state.ended:
                try:
                    relative = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self._object(state, source, target, relative)

        await asyncio.gather(*(work() for _ in range(max(1, self.concurrency))))
        if not stop.is_set() and not state.ended:
            await state.record(repo, self.name, lambda j: j.finish(_now()))

    async def _listing(self, job: BatchJob, source: Location) -> list[str]:
        """The job's input keys: listed once (with ``BatchJobListed``), then read back."""
        async with self.commands.pool.acquire() as conn:
            stored = await conn.fetch(
                f"SELECT key FROM {SCHEMA}.batch_inputs WHERE job_id = $1 ORDER BY key", job.id
            )
            if job.status != "pending":
                return [r["key"] for r in stored]
            keys = sorted(
                k[len(source.prefix) :]
                for k in await source.store.list(source.prefix)
                if not k.endswith("/")
            )
            job.listed(len(keys), _now())
            try:
                async with conn.transaction():
                    await conn.execute(
                        f"DELETE FROM {SCHEMA}.batch_inputs WHERE job_id = $1", job.id
                    )
                    await conn.executemany(
                        f"INSERT INTO {SCHEMA}.batch_inputs (job_id, key) VALUES ($1, $2)",
                        [(job.id, k) for k in keys],
                    )
                    await self.commands.repo.save(job, conn=conn, actor=self.name)
            except ConcurrencyError:
                raise _Cancelled from None
            return keys

    async def _object(
        self, state: _JobState, source: Location, target: Location, relative: str
    ) -> None:
        job = state.job
        try:
            data = await source.store.get_bytes(source.key(relative))
            items, lines = payloads(relative, data)
            answers = []
            for number, payload in enumerate(items, start=1):
                answer = await self._predict(job, payload)
                if isinstance(answer, str):
                    where = f"line {number}: " if lines else ""
                    raise ValueError(where + answer)
                answers.append(answer)
            output_key = target.key(f"{relative}.out")
            body = b"".join(_answer_line(a) + b"\n" for a in answers) if lines else answers[0]
            await target.store.put_bytes(output_key, body)
        except (ValueError, ShipyardError) as exc:
            reason = _reason(exc)
            await state.record(
                self.commands.repo, self.name, lambda j: j.object_failed(relative, reason, _now())
            )
        else:
            await state.record(
                self.commands.repo,
                self.name,
                lambda j: j.succeeded(relative, output_key, len(answers), _now()),
            )
        self.objects_done += 1

    async def _predict(self, job: BatchJob, payload: bytes) -> bytes | str:
        """The model's answer to one payload, or the reason it failed (after retries)."""
        error = ""
        for attempt in range(1, self.max_attempts + 1):
            outcome = await self.gateway.call(
                job.deployment,
                f"batch-{job.id}",
                model_path=RAW_PATH,
                caller=job.caller,
                group=job.group,
                content_type="application/json",
                body=payload,
                request_id=f"batch-{job.id[:12]}-{uuid.uuid4().hex[:8]}",
            )
            if outcome.ok:
                return outcome.body
            error = outcome.error
            if outcome.final or attempt == self.max_attempts:
                break
            await asyncio.sleep(self.retry_delay * 2 ** (attempt - 1))
        return error


class _JobState:
    """The job as this runner last saved it; appends are serialized through it."""

    def __init__(self, job: BatchJob) -> None:
        self.job = job
        self.lock = asyncio.Lock()
        self.ended = False

    async def record(
        self, repo: Repository[BatchJob], actor: str, decide: Callable[[BatchJob], None]
    ) -> None:
        """Applies ``decide`` and saves; on a conflict (a cancel) reloads and decides
        again, or stops the job when it ended."""
        async with self.lock:
            while not self.ended:
                decide(self.job)
                try:
                    await repo.save(self.job, actor=actor)
                    return
                except ConcurrencyError:
                    self.job = await repo.load(self.job.id)
                    if self.job.ended:
                        self.ended = True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ShipyardError):
        return exc.message
    return str(exc) or type(exc).__name__
