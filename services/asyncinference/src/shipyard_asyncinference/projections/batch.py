"""The ``batch_jobs`` read model: one row per job with its progress counters, for the
list queries and for runners looking for work."""

from __future__ import annotations

from collections.abc import Iterable

from shipyard_asyncinference.projections.requests import SCHEMA
from shipyard_core.eventstore import StoredEvent
from shipyard_core.projections import Projection, Statement


class BatchJobsProjection(Projection):
    """Rows of ``asyncinference.batch_jobs``."""

    name = "batch_jobs"
    schema = SCHEMA
    sources = ((SCHEMA, "batch_job"),)
    tables = {
        "batch_jobs": (
            "job_id text PRIMARY KEY, deployment text NOT NULL, group_name text NOT NULL, "
            "caller text NOT NULL, input text NOT NULL, output text NOT NULL, "
            "status text NOT NULL, total bigint NOT NULL DEFAULT 0, "
            "done bigint NOT NULL DEFAULT 0, failed bigint NOT NULL DEFAULT 0, "
            "error text NOT NULL DEFAULT '', created_at timestamptz NOT NULL, "
            "finished_at timestamptz"
        ),
    }
    indexes = (("batch_jobs", "deployment, created_at"), ("batch_jobs", "status"))

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        """The row change of one event."""
        p = event.payload
        jid = event.aggregate_id
        kind = event.event_type
        if kind == "BatchJobCreated":
            yield Statement(
                "INSERT INTO {batch_jobs} (job_id, deployment, group_name, caller, input, "
                "output, status, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', "
                "$7::text::timestamptz)",
                (jid, p["deployment"], p["group"], p["caller"], p["input"], p["output"], p["at"]),
            )
        elif kind == "BatchJobListed":
            yield Statement(
                "UPDATE {batch_jobs} SET status = 'running', total = $2 WHERE job_id = $1",
                (jid, int(p["total"])),
            )
        elif kind == "BatchObjectSucceeded":
            yield Statement("UPDATE {batch_jobs} SET done = done + 1 WHERE job_id = $1", (jid,))
        elif kind == "BatchObjectFailed":
            yield Statement("UPDATE {batch_jobs} SET failed = failed + 1 WHERE job_id = $1", (jid,))
        elif kind in ("BatchJobFinished", "BatchJobFailed", "BatchJobCancelled"):
            status = {
                "BatchJobFinished": "completed",
                "BatchJobFailed": "failed",
                "BatchJobCancelled": "cancelled",
            }[kind]
            yield Statement(
                "UPDATE {batch_jobs} SET status = $2, error = $3, "
                "finished_at = $4::text::timestamptz WHERE job_id = $1",
                (jid, status, str(p.get("error", "")), p["at"]),
            )
