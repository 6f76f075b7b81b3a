"""Batch jobs through the gateway: one prediction per object under an input prefix.

>>> job = client.batch.create("iris-prod", "s3://bucket/in/", "s3://bucket/out/")
>>> client.batch.wait("iris-prod", job.job_id).done

Inputs: ``.json`` (one prediction), ``.jsonl`` (one per line), ``.csv`` (one per row, the
payload ``{column: value}``); outputs ``<output>/<relative key>.out``. See
docs/decisions/0028-batch-jobs.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from shipyard.client._convert import PlainData
from shipyard.client.async_requests import GatewayHttp, _time
from shipyard.client.deployments import GATEWAY
from shipyard.client.errors import DeadlineExceeded

__all__ = ["BATCH_STATUSES", "BatchClient", "BatchFailure", "BatchJobView"]

BATCH_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
_ENDED = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class BatchFailure(PlainData):
    """One input object that failed, and why."""

    key: str
    reason: str


@dataclass(frozen=True)
class BatchJobView(PlainData):
    """A batch job and its progress."""

    job_id: str
    deployment: str
    status: str
    input: str = ""
    output: str = ""
    total: int = 0
    done: int = 0
    failed: int = 0
    error: str = ""
    caller: str = ""
    created_at: Any = None
    finished_at: Any = None
    failures: list[BatchFailure] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        """Whether it completed, failed or was cancelled."""
        return self.status in _ENDED

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchJobView:
        """From the gateway's batch document."""
        return cls(
            job_id=str(data.get("job_id", "")),
            deployment=str(data.get("deployment", "")),
            status=str(data.get("status", "")),
            input=str(data.get("input") or ""),
            output=str(data.get("output") or ""),
            total=int(data.get("total") or 0),
            done=int(data.get("done") or 0),
            failed=int(data.get("failed") or 0),
            error=str(data.get("error") or ""),
            caller=str(data.get("caller") or ""),
            created_at=_time(data.get("created_at")),
            finished_at=_time(data.get("finished_at")),
            failures=[
                BatchFailure(str(f.get("key", "")), str(f.get("reason", "")))
                for f in data.get("failures") or []
            ],
        )


class BatchClient(GatewayHttp):
    """Batch jobs. Obtain it as ``Client().batch``."""

    def create(
        self, deployment: str, input: str, output: str, *, token: str | None = None
    ) -> BatchJobView:
        """Starts a job over every object under ``input`` (``s3://bucket/prefix/`` or
        ``file:///path/``), writing ``<output>/<relative key>.out`` per object."""
        answer = self._request(
            "POST",
            self._url(deployment, "/batch"),
            deployment,
            token=token,
            body=json.dumps({"input": input, "output": output}).encode(),
            headers={"Content-Type": "application/json"},
        )
        return BatchJobView.from_json(answer)

    def status(self, deployment: str, job_id: str, *, token: str | None = None) -> BatchJobView:
        """A job's progress and its failed objects (the first 1000)."""
        answer = self._request(
            "GET", self._url(deployment, f"/batch/{job_id}"), deployment, token=token
        )
        return BatchJobView.from_json(answer)

    def list(self, deployment: str, *, token: str | None = None) -> list[BatchJobView]:
        """A deployment's jobs, newest first."""
        answer = self._request("GET", self._url(deployment, "/batch"), deployment, token=token)
        return [BatchJobView.from_json(j) for j in answer.get("jobs", [])]

    def cancel(self, deployment: str, job_id: str, *, token: str | None = None) -> BatchJobView:
        """Cancels a job that has not ended (objects finished stay written)."""
        answer = self._request(
            "POST", self._url(deployment, f"/batch/{job_id}/cancel"), deployment, token=token
        )
        return BatchJobView.from_json(answer)

    def wait(
        self,
        deployment: str,
        job_id: str,
        *,
        timeout: float | None = None,
        token: str | None = None,
    ) -> BatchJobView:
        """Polls until the job ended; DeadlineExceeded after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.1
        while True:
            view = self.status(deployment, job_id, token=token)
            if view.ended:
                return view
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise DeadlineExceeded(
                    f"batch job {job_id} of {deployment} is still {view.status} "
                    f"({view.done + view.failed}/{view.total}) after {timeout:g}s",
                    service=GATEWAY,
                    method="wait",
                    hint=f"it goes on: `shipyard batch status --deployment {deployment} {job_id}`",
                )
            time.sleep(pause if deadline is None else min(pause, max(deadline - now, 0.0)))
            pause = min(pause * 1.5, 2.0)
