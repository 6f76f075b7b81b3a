"""AsyncInferenceService over gRPC: protobuf in, app call, protobuf out. No logic here."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from shipyard.asyncinference.v1 import asyncinference_pb2 as pb
from shipyard.asyncinference.v1 import asyncinference_pb2_grpc as pb_grpc
from shipyard_asyncinference.app import AsyncCommands, AsyncQueries, RequestView, Submission
from shipyard_asyncinference.app.batch import BatchCommands, BatchView
from shipyard_core.auth import current_principal
from shipyard_core.errors import ShipyardError
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_core.grpckit.errors import status_for_exception

_STATUS = {
    "queued": pb.ASYNC_STATUS_QUEUED,
    "running": pb.ASYNC_STATUS_RUNNING,
    "completed": pb.ASYNC_STATUS_COMPLETED,
    "failed": pb.ASYNC_STATUS_FAILED,
    "cancelled": pb.ASYNC_STATUS_CANCELLED,
}
_STATUS_NAME = {v: k for k, v in _STATUS.items()}


def request_message(view: RequestView) -> pb.AsyncRequest:
    """A RequestView as protobuf."""
    return pb.AsyncRequest(
        request_id=view.request_id,
        deployment=view.deployment,
        group=view.group,
        caller=view.caller,
        status=_STATUS.get(view.status, pb.ASYNC_STATUS_UNSPECIFIED),
        attempts=view.attempts,
        error=view.error,
        created_at=to_timestamp(view.created_at),
        started_at=to_timestamp(view.started_at),
        finished_at=to_timestamp(view.finished_at),
        expires_at=to_timestamp(view.expires_at),
        expired=view.expired,
        protocol=view.protocol,
        model_path=view.model_path,
        payload_bytes=view.payload_bytes,
        result_bytes=view.result_bytes,
        result_status=view.result_status,
        content_type=view.content_type,
    )


def _submission(request: pb.SubmitRequest) -> Submission:
    return Submission(
        deployment=request.deployment,
        group=request.group,
        caller=request.caller,
        model_path=request.model_path,
        content_type=request.content_type,
        body=request.body,
        protocol=request.protocol,
        client_request_id=request.client_request_id,
    )


def batch_message(view: BatchView) -> pb.BatchJob:
    """A BatchView as protobuf."""
    return pb.BatchJob(
        job_id=view.job_id,
        deployment=view.deployment,
        group=view.group,
        caller=view.caller,
        input=view.input,
        output=view.output,
        status=view.status,
        total=view.total,
        done=view.done,
        failed=view.failed,
        error=view.error,
        created_at=to_timestamp(view.created_at),
        finished_at=to_timestamp(view.finished_at),
        failures=[pb.BatchFailure(key=k, reason=r) for k, r in view.failures],
    )


class AsyncInferenceServicer(pb_grpc.AsyncInferenceServiceServicer):
    """``shipyard.asyncinference.v1.AsyncInferenceService``."""

    def __init__(
        self, commands: AsyncCommands, queries: AsyncQueries, batches: BatchCommands
    ) -> None:
        self.commands = commands
        self.queries = queries
        self.batches = batches

    async def Submit(self, request: pb.SubmitRequest, context: Any) -> pb.AsyncRequest:
        """Stores and queues a request (internal only)."""
        view = await self.commands.submit(current_principal(), _submission(request))
        return request_message(view)

    async def SubmitMany(
        self, request: pb.SubmitManyRequest, context: Any
    ) -> pb.SubmitManyResponse:
        """Stores and queues several requests, each accepted or refused (internal only)."""
        outcomes = await self.commands.submit_many(
            current_principal(), [_submission(r) for r in request.requests]
        )
        answer = pb.SubmitManyResponse()
        for outcome in outcomes:
            if isinstance(outcome, ShipyardError):
                code, message = status_for_exception(outcome, method="SubmitMany")
                answer.outcomes.add(code=code.value[0], message=message)
            else:
                answer.outcomes.add(request=request_message(outcome))
        return answer

    async def GetRequest(self, request: pb.GetRequestRequest, context: Any) -> pb.AsyncRequest:
        """One request's status."""
        view = await self.queries.get(current_principal(), request.deployment, request.request_id)
        return request_message(view)

    async def GetResult(self, request: pb.GetResultRequest, context: Any) -> pb.AsyncResult:
        """A completed request's result."""
        result = await self.queries.result(
            current_principal(), request.deployment, request.request_id
        )
        return pb.AsyncResult(
            request_id=result.request_id,
            status=result.status,
            content_type=result.content_type,
            body=result.body,
        )

    async def ListRequests(
        self, request: pb.ListRequestsRequest, context: Any
    ) -> pb.ListRequestsResponse:
        """A deployment's requests, newest first."""
        views = await self.queries.search(
            current_principal(),
            request.deployment,
            status=_STATUS_NAME.get(request.status, ""),
            since=request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None,
            limit=request.limit,
        )
        return pb.ListRequestsResponse(requests=[request_message(v) for v in views])

    async def CancelRequest(
        self, request: pb.CancelRequestRequest, context: Any
    ) -> pb.AsyncRequest:
        """Cancels a queued request."""
        view = await self.commands.cancel(
            current_principal(), request.deployment, request.request_id
        )
        return request_message(view)

    async def CreateBatchJob(self, request: pb.CreateBatchJobRequest, context: Any) -> pb.BatchJob:
        """Starts a batch job (internal only)."""
        view = await self.batches.create(
            current_principal(),
            request.deployment,
            request.group,
            request.caller,
            request.input,
            request.output,
        )
        return batch_message(view)

    async def GetBatchJob(self, request: pb.GetBatchJobRequest, context: Any) -> pb.BatchJob:
        """One batch job."""
        view = await self.batches.get(current_principal(), request.deployment, request.job_id)
        return batch_message(view)

    async def ListBatchJobs(
        self, request: pb.ListBatchJobsRequest, context: Any
    ) -> pb.ListBatchJobsResponse:
        """A deployment's batch jobs."""
        views = await self.batches.search(current_principal(), request.deployment, request.limit)
        return pb.ListBatchJobsResponse(jobs=[batch_message(v) for v in views])

    async def CancelBatchJob(self, request: pb.CancelBatchJobRequest, context: Any) -> pb.BatchJob:
        """Cancels a batch job."""
        view = await self.batches.cancel(current_principal(), request.deployment, request.job_id)
        return batch_message(view)
