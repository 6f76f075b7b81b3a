"""Asynchronous requests on the REST data plane (the asyncinference service keeps them).

Submitting: any prediction route (OIP v2 ``infer``, KServe v1 ``:predict``, Seldon, raw
JSON) with ``X-Async-Request: true`` is checked exactly like a synchronous request (body
limit, the protocol's envelope check for small bodies, :meth:`PredictHandler.authorize`,
a stopped deployment is 503), then handed to ``AsyncInferenceService.Submit`` with the
caller, the deployment's group, the model server path, the content type and the body, and
answered ``202`` with ``{"request_id", "status": "queued", ...}`` and
``Location: /deployments/{d}/async/{id}``.

Following it up (same credentials as a prediction of the deployment):

- ``GET /deployments/{d}/async/{id}``: status (``queued | running | completed | failed |
  cancelled``), attempts, times, the error, whether it expired;
- ``GET /deployments/{d}/async/{id}/result``: the model's answer as it gave it (status
  200, its content type; ``Content-Disposition: attachment``); 409 while it is not
  completed, 410 once its retention ended;
- ``GET /deployments/{d}/async?status=&since=&limit=``: the deployment's requests, newest
  first. Listing needs a credential that could call the deployment were it private (a
  member's token or one of its client keys), also for public deployments;
- ``DELETE /deployments/{d}/async/{id}`` or ``POST .../{id}/cancel``: cancels a queued
  request (409 once it runs).

Refusals of the access check on these routes are 404 (a team-b caller cannot tell a
team-a request from none), except 401 for missing credentials.

Batch jobs (same credentials as a prediction; listing like async requests):
``POST /deployments/{d}/batch`` with ``{"input": "s3://b/in/", "output": "s3://b/out/"}``
(``201`` and ``Location: /deployments/{d}/batch/{id}``), ``GET /deployments/{d}/batch``,
``GET /deployments/{d}/batch/{id}`` (progress and per-object failures), ``DELETE`` it or
``POST .../{id}/cancel``.

Running: the service's workers call ``POST /deployments/{d}/async/runs`` with the
internal token and a lot of requests in the batch wire format (one exchange with one
model server: its ``/shipyard/batch``), or ``POST /deployments/{d}/async/{id}/run`` for
one; each request is forwarded like a synchronous prediction of its original caller (the
caller and the deployment's group: ``X-Shipyard-Caller`` / ``X-Shipyard-Group``, or the
part's head), waking a deployment scaled to zero. ``X-Shipyard-Answered-By: model |
gateway`` (a part's ``answered_by``) tells the worker who answered. Each run is recorded
in the metrics with protocol ``async``, as are refused submissions (an accepted one is
counted once, by its run).

Wiring (in :func:`shipyard_gateway.main.build`, after ``create_app``)::

    mount_async_api(app, handler, recorder, asyncinference_addr=...,
                    internal_token=settings.internal_token,
                    max_body_bytes=settings.max_body_bytes,
                    check_body_max_bytes=settings.check_body_max_bytes)
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import grpc
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from shipyard.asyncinference.v1 import asyncinference_pb2 as apb
from shipyard.asyncinference.v1 import asyncinference_pb2_grpc
from shipyard_core.auth import Principal
from shipyard_core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ShipyardError,
    Unauthenticated,
    Unavailable,
)
from shipyard_core.grpckit.errors import error_from_rpc, status_for_exception
from shipyard_core.grpckit.interceptors import (
    CORRELATION_HEADER,
    TracingClientInterceptor,
    bearer_metadata,
)
from shipyard_core.metadata import correlation_id_var
from shipyard_gateway.access import WWW_AUTHENTICATE, credentials_from_headers
from shipyard_gateway.errors import (
    DeploymentStopped,
    PayloadTooLarge,
    http_status_for_exception,
)
from shipyard_gateway.handler import RAW_PREDICT_PATH, BatchItem, PredictHandler, not_found
from shipyard_gateway.http import PREDICT_ROUTE, error_response
from shipyard_gateway.metrics import MetricsRecorder
from shipyard_gateway.protocols import (
    ASYNC,
    RAW,
    SELDON,
    V1,
    V2,
    check_kserve_v1,
    check_oip,
    check_seldon,
    error_body,
)
from shipyard_gateway.routing import Access
from shipyard_gateway.submissions import SubmitCoalescer
from shipyard_runtime import batchwire

__all__ = [
    "ANSWERED_BY",
    "ASYNC_HEADER",
    "AsyncApi",
    "mount_async_api",
]

ASYNC_HEADER = "X-Async-Request"
"""``true`` makes a prediction asynchronous."""
ANSWERED_BY = "X-Shipyard-Answered-By"
MODEL_PATH_HEADER = "X-Shipyard-Model-Path"
CALLER_HEADER = "X-Shipyard-Caller"
GROUP_HEADER = "X-Shipyard-Group"

_TRUE = frozenset({"true", "1", "yes"})
_JSON = "application/json"
_SUBMIT_TIMEOUT = 30.0
_ONE_BY_ONE_SECONDS = 60.0
"""After an asyncinference answered UNIMPLEMENTED to SubmitMany (an older release during
a rolling upgrade), submissions go one by one this long before SubmitMany is tried again."""
_QUERY_TIMEOUT = 10.0
_SELDON_PATH = "/api/v1.0/predictions"

_STATUS_NAMES = {
    apb.ASYNC_STATUS_QUEUED: "queued",
    apb.ASYNC_STATUS_RUNNING: "running",
    apb.ASYNC_STATUS_COMPLETED: "completed",
    apb.ASYNC_STATUS_FAILED: "failed",
    apb.ASYNC_STATUS_CANCELLED: "cancelled",
}
_STATUS_VALUES = {name: value for value, name in _STATUS_NAMES.items()}

Check = Callable[[bytes], None]


@dataclasses.dataclass(frozen=True)
class _Shape:
    """One prediction route: its protocol, body check, and model server path."""

    protocol: str
    check: Check | None
    path: Callable[[str], str]


# Route templates (aiohttp's canonical form) of the prediction routes of http.py.
_PREDICTION_ROUTES: dict[str, _Shape] = {
    PREDICT_ROUTE: _Shape(RAW, None, lambda d: RAW_PREDICT_PATH),
    "/v2/models/{deployment}/infer": _Shape(V2, check_oip, lambda d: f"/v2/models/{d}/infer"),
    "/v2/models/{deployment}/versions/{version}/infer": _Shape(
        V2, check_oip, lambda d: f"/v2/models/{d}/infer"
    ),
    "/v1/models/{deployment}:predict": _Shape(
        V1, check_kserve_v1, lambda d: f"/v1/models/{d}:predict"
    ),
    "/deployment/{deployment}/api/v1.0/predictions": _Shape(
        SELDON, check_seldon, lambda d: _SELDON_PATH
    ),
}


def _model_paths(deployment: str) -> set[str]:
    return {shape.path(deployment) for shape in _PREDICTION_ROUTES.values()}


def _iso(ts: Timestamp, present: bool) -> str | None:
    if not present:
        return None
    return ts.ToDatetime(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def status_document(msg: apb.AsyncRequest) -> dict[str, Any]:
    """The JSON answer of the status route."""
    status = _STATUS_NAMES.get(msg.status, "unknown")
    base = f"/deployments/{quote(msg.deployment, safe='')}/async/{msg.request_id}"
    document: dict[str, Any] = {
        "request_id": msg.request_id,
        "deployment": msg.deployment,
        "status": status,
        "attempts": msg.attempts,
        "error": msg.error or None,
        "created_at": _iso(msg.created_at, msg.HasField("created_at")),
        "started_at": _iso(msg.started_at, msg.HasField("started_at")),
        "finished_at": _iso(msg.finished_at, msg.HasField("finished_at")),
        "expires_at": _iso(msg.expires_at, msg.HasField("expires_at")),
        "expired": msg.expired,
        "protocol": msg.protocol,
        "caller": msg.caller,
        "payload_bytes": msg.payload_bytes,
        "result_bytes": msg.result_bytes,
        "location": base,
    }
    if status == "completed" and not msg.expired:
        document["result_url"] = f"{base}/result"
        document["result_status"] = msg.result_status
    return document


def batch_location(job: apb.BatchJob) -> str:
    """``/deployments/{d}/batch/{id}``."""
    return f"/deployments/{quote(job.deployment, safe='')}/batch/{job.job_id}"


def batch_document(job: apb.BatchJob, *, failures: bool = False) -> dict[str, Any]:
    """The JSON answer of the batch routes."""
    document: dict[str, Any] = {
        "job_id": job.job_id,
        "deployment": job.deployment,
        "status": job.status,
        "input": job.input,
        "output": job.output,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "error": job.error or None,
        "caller": job.caller,
        "created_at": _iso(job.created_at, job.HasField("created_at")),
        "finished_at": _iso(job.finished_at, job.HasField("finished_at")),
        "location": batch_location(job),
    }
    if failures:
        document["failures"] = [{"key": f.key, "reason": f.reason} for f in job.failures]
    return document


def _is_async(value: str | None) -> bool:
    return value is not None and value.strip().lower() in _TRUE


class AsyncApi:
    """The async routes and the submission middleware (see the module docstring)."""

    def __init__(
        self,
        handler: PredictHandler,
        metrics: MetricsRecorder,
        *,
        asyncinference_addr: str,
        internal_token: str,
        max_body_bytes: int,
        check_body_max_bytes: int,
    ) -> None:
        self.handler = handler
        self.metrics = metrics
        self.addr = asyncinference_addr
        self.max_body_bytes = max_body_bytes
        self.check_body_max_bytes = check_body_max_bytes
        self._metadata = bearer_metadata(internal_token) if internal_token else ()
        self._channels: list[grpc.aio.Channel] = []
        self._stub: asyncinference_pb2_grpc.AsyncInferenceServiceStub | None = None
        self._traced_stub: asyncinference_pb2_grpc.AsyncInferenceServiceStub | None = None
        self._one_by_one_until = 0.0
        self.submissions = SubmitCoalescer(self._submit_many)
        """Concurrent submissions share ``SubmitMany`` calls (decision 0034)."""

    # -- the service ---------------------------------------------------------------------

    def stub(self, *, traced: bool = False) -> asyncinference_pb2_grpc.AsyncInferenceServiceStub:
        """The service's stub (its channel opens on first use, in the running loop).

        ``traced``: through a channel with the tracing interceptor, for calls made inside
        a recorded span. Untraced calls (the gateway records spans only for traced
        requests) skip grpc's interceptor machinery, which costs more than the call's
        own work on this path."""
        if traced:
            if self._traced_stub is None:
                self._traced_stub = self._open([TracingClientInterceptor()])
            return self._traced_stub
        if self._stub is None:
            self._stub = self._open([])
        return self._stub

    def _open(self, interceptors: list[Any]) -> asyncinference_pb2_grpc.AsyncInferenceServiceStub:
        limit = self.max_body_bytes + 64 * 1024
        channel = grpc.aio.insecure_channel(
            self.addr,
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
            interceptors=interceptors or None,
        )
        self._channels.append(channel)
        return asyncinference_pb2_grpc.AsyncInferenceServiceStub(channel)

    async def _call(self, method: str, request: Any, timeout: float) -> Any:  # noqa: ASYNC109
        traced = trace.get_current_span().is_recording()
        metadata = self._metadata
        correlation = correlation_id_var.get()
        if correlation and not traced:  # the interceptor adds it on the traced channel
            metadata = (*metadata, (CORRELATION_HEADER, correlation))
        try:
            return await getattr(self.stub(traced=traced), method)(
                request, metadata=metadata, timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    "the async inference service is unavailable; retry shortly"
                ) from None
            raise error_from_rpc(err) from None

    async def _submit(self, request: apb.SubmitRequest) -> apb.AsyncRequest:
        # A traced request goes alone, so its trace context travels with its call.
        coalesce = time.monotonic() >= self._one_by_one_until
        if coalesce and not trace.get_current_span().is_recording():
            return await self.submissions.submit(request)
        answer: apb.AsyncRequest = await self._call("Submit", request, _SUBMIT_TIMEOUT)
        return answer

    async def _submit_many(
        self, requests: Sequence[apb.SubmitRequest]
    ) -> Sequence[apb.SubmitOutcome]:
        try:
            answer = await self._call(
                "SubmitMany", apb.SubmitManyRequest(requests=requests), _SUBMIT_TIMEOUT
            )
        except ShipyardError as exc:
            if not exc.message.startswith("UNIMPLEMENTED"):
                raise
            # An asyncinference older than this gateway (a rolling upgrade): one by one
            # for a while, then SubmitMany is tried again.
            self._one_by_one_until = time.monotonic() + _ONE_BY_ONE_SECONDS
            outcomes = []
            for request in requests:
                try:
                    one = await self._call("Submit", request, _SUBMIT_TIMEOUT)
                    outcomes.append(apb.SubmitOutcome(request=one))
                except ShipyardError as refusal:  # its own answer, stored ones keep theirs
                    code, message = status_for_exception(refusal)
                    outcomes.append(apb.SubmitOutcome(code=code.value[0], message=message))
            return outcomes
        return list(answer.outcomes)

    async def close(self, _app: web.Application | None = None) -> None:
        """Closes the channel (an ``on_cleanup`` hook)."""
        channels, self._channels = self._channels, []
        self._stub = self._traced_stub = None
        for channel in channels:
            await channel.close()

    # -- helpers -------------------------------------------------------------------------

    def _failure(self, exc: BaseException, request: web.Request, protocol: str) -> web.Response:
        status, message = http_status_for_exception(exc, where=f"{request.method} {request.path}")
        headers: dict[str, str] = {}
        if isinstance(exc, Unauthenticated):
            headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        return error_response(status, message, headers, protocol)

    async def _body(self, request: web.Request) -> bytes:
        too_large = PayloadTooLarge(
            f"request body is larger than the gateway's limit of {self.max_body_bytes} bytes; "
            "send a smaller request, or use a batch job"
        )
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise too_large
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None

    async def _visible(self, request: web.Request, *, listing: bool = False) -> None:
        """The access check of the follow-up routes; refusals are NotFound."""
        deployment = request.match_info["deployment"]
        try:
            route, _ = await self.handler.authorize(deployment, request.headers)
            if listing and route.access is Access.PUBLIC:
                # Calling a public deployment needs nothing; seeing everyone's requests
                # to it needs what a private one would ask for.
                await self.handler.access.caller(
                    dataclasses.replace(route, access=Access.PRIVATE), request.headers
                )
        except PermissionDenied:
            what = "batch job" if "job_id" in request.match_info else "async request"
            ident = request.match_info.get("job_id") or request.match_info.get("request_id", "")
            # Worded like a deployment that does not exist: another group cannot tell.
            if listing:
                raise not_found(deployment) from None
            raise NotFound(
                f"{what} {ident[:64]!r} of deployment {deployment!r} does not exist"
            ) from None

    # -- submission ----------------------------------------------------------------------

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Takes prediction requests marked ``X-Async-Request: true``."""
        if request.method == "POST" and _is_async(request.headers.get(ASYNC_HEADER)):
            resource = request.match_info.route.resource
            shape = _PREDICTION_ROUTES.get(resource.canonical) if resource is not None else None
            if shape is not None:
                return await self.submit(request, shape)
        return await handler(request)

    async def submit(self, request: web.Request, shape: _Shape) -> web.Response:
        """Accepts one async prediction: 202 with its id."""
        start = time.perf_counter()
        deployment = request.match_info["deployment"]
        try:
            body = await self._body(request)
            if shape.check is not None and len(body) <= self.check_body_max_bytes:
                shape.check(body)
            route, caller = await self.handler.authorize(
                deployment, request.headers, version=request.match_info.get("version", "")
            )
            if route.stopped:
                raise DeploymentStopped(deployment)
            try:
                answer = await self._submit(
                    apb.SubmitRequest(
                        deployment=deployment,
                        group=route.group,
                        caller=caller.user if caller is not None else "",
                        model_path=shape.path(deployment),
                        content_type=request.headers.get("Content-Type") or _JSON,
                        body=body,
                        protocol=shape.protocol,
                        client_request_id=request.headers.get("X-Request-Id", "")[:128],
                    )
                )
            except ResourceExhausted as exc:  # the service's payload limit
                raise PayloadTooLarge(exc.message) from None
            location = f"/deployments/{quote(deployment, safe='')}/async/{answer.request_id}"
            document = {
                "request_id": answer.request_id,
                "deployment": deployment,
                "status": "queued",
                "location": location,
            }
            # Counted once, by its run (see the module docstring).
            return web.json_response(document, status=202, headers={"Location": location})
        except Exception as exc:
            response = self._failure(exc, request, shape.protocol)
            self.metrics.record(deployment, response.status, time.perf_counter() - start, ASYNC)
            return response

    # -- follow-up -----------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        """``GET /deployments/{d}/async/{id}``."""
        try:
            await self._visible(request)
            msg = await self._call(
                "GetRequest",
                apb.GetRequestRequest(
                    deployment=request.match_info["deployment"],
                    request_id=request.match_info["request_id"],
                ),
                _QUERY_TIMEOUT,
            )
            return web.json_response(status_document(msg))
        except Exception as exc:
            return self._failure(exc, request, RAW)

    async def result(self, request: web.Request) -> web.Response:
        """``GET /deployments/{d}/async/{id}/result``."""
        deployment = request.match_info["deployment"]
        request_id = request.match_info["request_id"]
        try:
            await self._visible(request)
            msg = await self._call(
                "GetRequest",
                apb.GetRequestRequest(deployment=deployment, request_id=request_id),
                _QUERY_TIMEOUT,
            )
            document = status_document(msg)
            if msg.expired:
                return web.json_response(
                    {
                        **document,
                        "error": f"async request {request_id} expired: its payload and "
                        "result were removed at the end of the retention period",
                    },
                    status=410,
                )
            if msg.status != apb.ASYNC_STATUS_COMPLETED:
                reason = f": {msg.error}" if msg.error else ""
                return web.json_response(
                    {
                        **document,
                        "error": f"async request {request_id} is {document['status']}"
                        f"{reason}; the result exists once it is completed",
                    },
                    status=409,
                )
            result = await self._call(
                "GetResult",
                apb.GetResultRequest(deployment=deployment, request_id=request_id),
                _QUERY_TIMEOUT,
            )
            return web.Response(
                body=result.body,
                headers={
                    "Content-Type": result.content_type or _JSON,
                    "Content-Disposition": f'attachment; filename="{request_id}.json"',
                    "X-Shipyard-Result-Status": str(result.status),
                },
            )
        except Exception as exc:
            return self._failure(exc, request, RAW)

    async def list_requests(self, request: web.Request) -> web.Response:
        """``GET /deployments/{d}/async?status=&since=&limit=``."""
        deployment = request.match_info["deployment"]
        try:
            query = request.query
            status_name = query.get("status", "")
            if status_name and status_name not in _STATUS_VALUES:
                raise InvalidArgument(
                    "status", f"{status_name[:40]!r} is not a status", "|".join(_STATUS_VALUES)
                )
            message = apb.ListRequestsRequest(
                deployment=deployment,
                status=_STATUS_VALUES.get(status_name, apb.ASYNC_STATUS_UNSPECIFIED),
            )
            since = query.get("since", "")
            if since:
                try:
                    moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
                except ValueError:
                    raise InvalidArgument(
                        "since", f"{since[:40]!r} is not a time", "ISO 8601, e.g. 2026-01-31T12:00Z"
                    ) from None
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)
                message.since.FromDatetime(moment)
            limit = query.get("limit", "")
            if limit:
                if not limit.isdigit():
                    raise InvalidArgument("limit", f"{limit[:20]!r} is not a number", "1 to 1000")
                message.limit = int(limit)
            await self._visible(request, listing=True)
            answer = await self._call("ListRequests", message, _QUERY_TIMEOUT)
            return web.json_response(
                {
                    "deployment": deployment,
                    "requests": [status_document(r) for r in answer.requests],
                }
            )
        except Exception as exc:
            return self._failure(exc, request, RAW)

    async def cancel(self, request: web.Request) -> web.Response:
        """``DELETE /deployments/{d}/async/{id}`` and ``POST .../{id}/cancel``."""
        try:
            await self._visible(request)
            try:
                msg = await self._call(
                    "CancelRequest",
                    apb.CancelRequestRequest(
                        deployment=request.match_info["deployment"],
                        request_id=request.match_info["request_id"],
                    ),
                    _QUERY_TIMEOUT,
                )
            except FailedPrecondition as exc:
                return error_response(409, exc.message, None, RAW)
            return web.json_response(status_document(msg))
        except Exception as exc:
            return self._failure(exc, request, RAW)

    # -- batch jobs ----------------------------------------------------------------------

    async def batch_create(self, request: web.Request) -> web.Response:
        """``POST /deployments/{d}/batch``."""
        deployment = request.match_info["deployment"]
        try:
            try:
                document = json.loads(await self._body(request))
            except ValueError:
                document = None
            if not isinstance(document, dict) or not all(
                isinstance(document.get(k), str) and document.get(k) for k in ("input", "output")
            ):
                raise InvalidArgument(
                    "body",
                    "needs the input and output locations",
                    'send {"input": "s3://bucket/in/", "output": "s3://bucket/out/"}',
                )
            route, caller = await self.handler.authorize(deployment, request.headers)
            if route.stopped:
                raise DeploymentStopped(deployment)
            job = await self._call(
                "CreateBatchJob",
                apb.CreateBatchJobRequest(
                    deployment=deployment,
                    group=route.group,
                    caller=caller.user if caller is not None else "",
                    input=document["input"],
                    output=document["output"],
                ),
                _QUERY_TIMEOUT,
            )
            return web.json_response(
                batch_document(job), status=201, headers={"Location": batch_location(job)}
            )
        except Exception as exc:
            return self._failure(exc, request, RAW)

    async def batch_status(self, request: web.Request) -> web.Response:
        """``GET /deployments/{d}/batch/{job_id}``."""
        try:
            await self._visible(request)
            job = await self._call(
                "GetBatchJob",
                apb.GetBatchJobRequest(
                    deployment=request.match_info["deployment"],
                    job_id=request.match_info["job_id"],
                ),
                _QUERY_TIMEOUT,
            )
            return web.json_response(batch_document(job, failures=True))
        except Exception as exc:
            return self._failure(exc, request, RAW)

    async def batch_list(self, request: web.Request) -> web.Response:
        """``GET /deployments/{d}/batch``."""
        deployment = request.match_info["deployment"]
        try:
            await self._visible(request, listing=True)
            answer = await self._call(
                "ListBatchJobs", apb.ListBatchJobsRequest(deployment=deployment), _QUERY_TIMEOUT
            )
            return web.json_response(
                {"deployment": deployment, "jobs": [batch_document(j) for j in answer.jobs]}
            )
        except Exception as exc:
            return self._failure(exc, request, RAW)

    async def batch_cancel(self, request: web.Request) -> web.Response:
        """``DELETE /deployments/{d}/batch/{job_id}`` and ``POST .../cancel``."""
        try:
            await self._visible(request)
            try:
                job = await self._call(
                    "CancelBatchJob",
                    apb.CancelBatchJobRequest(
                        deployment=request.match_info["deployment"],
                        job_id=request.match_info["job_id"],
                    ),
                    _QUERY_TIMEOUT,
                )
            except FailedPrecondition as exc:
                return error_response(409, exc.message, None, RAW)
            return web.json_response(batch_document(job))
        except Exception as exc:
            return self._failure(exc, request, RAW)

    # -- running (internal) --------------------------------------------------------------

    async def _internal_caller(self, request: web.Request) -> Principal:
        credentials = credentials_from_headers(request.headers)
        if credentials is None:
            raise Unauthenticated("the run route is for the async inference service's workers")
        principal = await self.handler.access.authenticator.authenticate(credentials.secret)
        if not principal.internal:
            raise PermissionDenied("the run route is for the async inference service's workers")
        return principal

    async def run(self, request: web.Request) -> web.Response:
        """``POST /deployments/{d}/async/{id}/run``: one attempt, for a worker."""
        start = time.perf_counter()
        deployment = request.match_info["deployment"]
        response: web.Response
        try:
            await self._internal_caller(request)
            path = request.headers.get(MODEL_PATH_HEADER, "")
            if path not in _model_paths(deployment):
                raise InvalidArgument(
                    MODEL_PATH_HEADER, f"{path[:80]!r} is not a prediction path of the deployment"
                )
            acting = _acting(
                request.headers.get(CALLER_HEADER, ""), request.headers.get(GROUP_HEADER, "")
            )
            headers = {
                "content-type": request.headers.get("Content-Type") or _JSON,
                "x-request-id": request.headers.get("X-Request-Id", ""),
            }
            for name in ("traceparent", "tracestate"):
                if request.headers.get(name):
                    headers[name] = request.headers[name]
            body = await self._body(request)
            reply = await self.handler.forward(deployment, path, body, headers, acting)
            response = web.Response(
                status=reply.status,
                body=reply.body,
                headers={
                    "Content-Type": reply.content_type,
                    "X-Request-Id": reply.request_id,
                    ANSWERED_BY: "model",
                },
            )
        except ShipyardError as exc:
            response = self._failure(exc, request, RAW)
            response.headers[ANSWERED_BY] = "gateway"
        except Exception as exc:
            response = self._failure(exc, request, RAW)
            response.headers[ANSWERED_BY] = "gateway"
        self.metrics.record(deployment, response.status, time.perf_counter() - start, ASYNC)
        return response

    async def runs(self, request: web.Request) -> web.Response:
        """``POST /deployments/{d}/async/runs``: one attempt of each of several requests
        of the deployment (a worker's lot), in the batch wire format
        (:mod:`shipyard_runtime.batchwire`). Each part's head names its ``model_path``,
        ``caller``, ``group``, ``content_type`` and ``request_id``; each answer part has the
        ``status``, ``content_type`` and ``answered_by`` (``model`` or ``gateway``) the
        run route would have answered for it alone. A refusal of the whole (the caller,
        an unknown or stopped deployment, no instance in time) is answered as the run
        route would, as a whole."""
        start = time.perf_counter()
        deployment = request.match_info["deployment"]
        try:
            await self._internal_caller(request)
            try:
                parts = batchwire.decode(await self._body(request))
            except ValueError as exc:
                raise InvalidArgument("body", str(exc), "the batch wire format") from exc
            answers: list[batchwire.Part | None] = [None] * len(parts)
            items: list[tuple[int, BatchItem]] = []
            paths = _model_paths(deployment)
            for i, part in enumerate(parts):
                head = part.head
                path = str(head.get("model_path", ""))
                if path not in paths:
                    answers[i] = _gateway_part(
                        InvalidArgument(
                            "model_path",
                            f"{path[:80]!r} is not a prediction path of the deployment",
                        ),
                        request,
                    )
                    continue
                caller = str(head.get("caller", ""))
                headers = {
                    # An unusable one is replaced, as for a synchronous request.
                    "x-request-id": str(head.get("request_id", "")),
                    "content-type": str(head.get("content_type") or _JSON),
                }
                if head.get("traceparent"):
                    headers["traceparent"] = str(head["traceparent"])
                # These become HTTP headers upstream (X-Forwarded-User for the caller): no
                # line breaks smuggled in.
                fields = {"caller": caller, **headers}
                bad = next((k for k, v in fields.items() if _BREAKS.search(v)), None)
                if bad is not None:
                    answers[i] = _gateway_part(
                        InvalidArgument(bad, "holds a line break or NUL", "a header's value"),
                        request,
                    )
                    continue
                acting = _acting(caller, str(head.get("group", "")))
                items.append((i, BatchItem(path, part.body, headers, acting)))
            replies = await self.handler.forward_batch(deployment, [item for _, item in items])
            for (i, _), reply in zip(items, replies, strict=True):
                if isinstance(reply, ShipyardError):
                    answers[i] = _gateway_part(reply, request)
                else:
                    head = {"status": reply.status, "content_type": reply.content_type}
                    answers[i] = batchwire.Part({**head, "answered_by": "model"}, reply.body)
        except Exception as exc:
            response = self._failure(exc, request, RAW)
            response.headers[ANSWERED_BY] = "gateway"
            self.metrics.record(deployment, response.status, time.perf_counter() - start, ASYNC)
            return response
        elapsed = time.perf_counter() - start
        for answer in answers:
            assert answer is not None
            self.metrics.record(deployment, int(answer.head["status"]), elapsed, ASYNC)
        return web.Response(
            status=200,
            body=batchwire.encode([a for a in answers if a is not None]),
            headers={"Content-Type": batchwire.CONTENT_TYPE, ANSWERED_BY: "gateway"},
        )


_BREAKS = re.compile(r"[\r\n\x00]")


def _acting(user: str, group: str) -> Principal | None:
    """The original caller of an async request, who passed the access check when
    submitting; the check at its run only holds when the deployment still belongs to
    that group (None: anonymous, a public deployment's caller)."""
    return Principal(user=user, admin=False, groups=frozenset({group})) if user else None


def _gateway_part(exc: BaseException, request: web.Request) -> batchwire.Part:
    """The answer part of a request the gateway refused itself."""
    status, message = http_status_for_exception(exc, where=f"{request.method} {request.path}")
    head = {"status": status, "content_type": _JSON, "answered_by": "gateway"}
    return batchwire.Part(head, error_body(RAW, status, message))


def mount_async_api(
    app: web.Application,
    handler: PredictHandler,
    metrics: MetricsRecorder,
    *,
    asyncinference_addr: str,
    internal_token: str,
    max_body_bytes: int,
    check_body_max_bytes: int,
) -> AsyncApi:
    """Adds the async routes and the ``X-Async-Request`` middleware to the gateway's
    ``app`` (before it starts); the channel to the service closes with the app."""
    api = AsyncApi(
        handler,
        metrics,
        asyncinference_addr=asyncinference_addr,
        internal_token=internal_token,
        max_body_bytes=max_body_bytes,
        check_body_max_bytes=check_body_max_bytes,
    )
    app.middlewares.append(api.middleware)
    base = "/deployments/{deployment}/async"
    app.router.add_get(base, api.list_requests)
    app.router.add_get(base + "/{request_id}", api.status)
    app.router.add_delete(base + "/{request_id}", api.cancel)
    app.router.add_get(base + "/{request_id}/result", api.result)
    app.router.add_post(base + "/{request_id}/cancel", api.cancel)
    app.router.add_post(base + "/{request_id}/run", api.run)
    app.router.add_post(base + "/runs", api.runs)
    batch = "/deployments/{deployment}/batch"
    app.router.add_post(batch, api.batch_create)
    app.router.add_get(batch, api.batch_list)
    app.router.add_get(batch + "/{job_id}", api.batch_status)
    app.router.add_delete(batch + "/{job_id}", api.batch_cancel)
    app.router.add_post(batch + "/{job_id}/cancel", api.batch_cancel)
    app.on_cleanup.append(api.close)
    return api
