"""The gateway's own errors, and THE table from domain errors to HTTP and gRPC statuses.

The gateway reuses the :mod:`shipyard_core.errors` tree (NotFound, Unauthenticated, ...)
and adds the failures only a proxy has. :data:`ERROR_STATUS` is the one table: each row
gives the HTTP status (REST data plane, every protocol shape) and the gRPC code (the Open
Inference Protocol gRPC service) of an error class. It is looked up along the class
hierarchy, so the most specific class wins (UpstreamTimeout is 504 / DEADLINE_EXCEEDED
although it is an Unavailable, which is 503 / UNAVAILABLE).

The same table read backwards turns a model server's HTTP answer into a domain error
(:func:`error_for_upstream_status`), which is how the gRPC data plane reports a model's
400 as INVALID_ARGUMENT: the first row with that HTTP status names the class.

Transports call :func:`http_status_for_exception` / :func:`grpc_status_for_exception` and
nothing else: a ShipyardError keeps its message (it is written for the caller); anything
else is a bug and becomes 500 / INTERNAL with a generic message and a reference id, the
traceback going to the log under that reference.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import NamedTuple

import grpc

from shipyard_core.errors import (
    AlreadyExists,
    ConcurrencyError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ShipyardError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "ERROR_STATUS",
    "HTTP_STATUS",
    "INTERNAL_MESSAGE",
    "BadGateway",
    "BadRequest",
    "DeploymentStopped",
    "ModelFailed",
    "PayloadTooLarge",
    "Status",
    "TooManyRequests",
    "UpstreamTimeout",
    "error_for_upstream_status",
    "grpc_status_for_exception",
    "http_reason",
    "http_status_for_error",
    "http_status_for_exception",
    "status_class",
]

log = logging.getLogger(__name__)


class BadRequest(InvalidArgument):
    """A malformed request body or tensor (the caller's mistake), with a message written
    whole (InvalidArgument composes ``field: problem (fix)``; envelope checks say more
    naturally what is wrong and what to send instead)."""

    def __init__(self, message: str) -> None:
        ShipyardError.__init__(self, message)
        self.field = ""


class DeploymentStopped(Unavailable):
    """The deployment exists but its owner stopped it: nothing serves it until started."""

    def __init__(self, deployment: str) -> None:
        super().__init__(
            f"deployment {deployment!r} is stopped; its owner can start it with "
            f"`shipyard deploy start {deployment}`"
        )
        self.deployment = deployment


class UpstreamTimeout(Unavailable):
    """The model server took longer than ``upstream_timeout_seconds`` to answer."""


class BadGateway(Unavailable):
    """The model server broke the exchange after the request was sent (closed the
    connection, sent a malformed response). The request may have reached the model, so
    it is not retried elsewhere."""


class ModelFailed(ShipyardError):
    """The model server answered 5xx: ``predict()`` failed for a reason that is not the
    caller's. Its message is the model server's (generic, with a request id)."""


class PayloadTooLarge(ResourceExhausted):
    """The request body is over ``max_body_bytes``."""


class TooManyRequests(ResourceExhausted):
    """The deployment has its concurrency limit of requests in flight at this gateway."""

    retry_after_seconds = 1
    """What ``Retry-After`` tells the caller: in-flight predictions finish in
    milliseconds to seconds, so one second is a fair first back-off."""


class Status(NamedTuple):
    """How one error class is answered."""

    http: int
    grpc: grpc.StatusCode


# The one table. Statuses follow the usual gRPC-to-HTTP mapping (google.rpc.Code); the
# order matters only for reading it backwards (error_for_upstream_status: first row wins).
ERROR_STATUS: Mapping[type[ShipyardError], Status] = MappingProxyType(
    {
        InvalidArgument: Status(400, grpc.StatusCode.INVALID_ARGUMENT),
        BadRequest: Status(400, grpc.StatusCode.INVALID_ARGUMENT),
        FailedPrecondition: Status(400, grpc.StatusCode.FAILED_PRECONDITION),
        Unauthenticated: Status(401, grpc.StatusCode.UNAUTHENTICATED),
        PermissionDenied: Status(403, grpc.StatusCode.PERMISSION_DENIED),
        NotFound: Status(404, grpc.StatusCode.NOT_FOUND),
        AlreadyExists: Status(409, grpc.StatusCode.ALREADY_EXISTS),
        ConcurrencyError: Status(409, grpc.StatusCode.ABORTED),
        PayloadTooLarge: Status(413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ResourceExhausted: Status(429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        TooManyRequests: Status(429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ModelFailed: Status(500, grpc.StatusCode.INTERNAL),
        BadGateway: Status(502, grpc.StatusCode.UNAVAILABLE),
        Unavailable: Status(503, grpc.StatusCode.UNAVAILABLE),
        DeploymentStopped: Status(503, grpc.StatusCode.UNAVAILABLE),
        UpstreamTimeout: Status(504, grpc.StatusCode.DEADLINE_EXCEEDED),
    }
)

HTTP_STATUS: Mapping[type[ShipyardError], int] = MappingProxyType(
    {cls: status.http for cls, status in ERROR_STATUS.items()}
)
"""The HTTP column of :data:`ERROR_STATUS` (a view of it, not a second table)."""

_CLASS_BY_HTTP: dict[int, type[ShipyardError]] = {}
for _cls, _status in ERROR_STATUS.items():
    _CLASS_BY_HTTP.setdefault(_status.http, _cls)

INTERNAL_MESSAGE = "internal error in the gateway; see its log, reference {reference}"
"""What a caller sees for an error that is not a ShipyardError (a bug)."""


def _lookup(error: ShipyardError) -> Status | None:
    for cls in type(error).__mro__:
        status = ERROR_STATUS.get(cls)
        if status is not None:
            return status
    return None


def http_status_for_error(error: ShipyardError) -> int | None:
    """The HTTP status of a domain error, looked up along its class hierarchy; None for a
    ShipyardError outside the table."""
    status = _lookup(error)
    return status.http if status is not None else None


def _internal(exc: BaseException, where: str) -> str:
    reference = uuid.uuid4().hex[:12]
    log.error(
        "unhandled %s in %s; reference %s",
        type(exc).__name__,
        where or "a request",
        reference,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"reference": reference},
    )
    return INTERNAL_MESSAGE.format(reference=reference)


def http_status_for_exception(exc: BaseException, *, where: str = "") -> tuple[int, str]:
    """The HTTP status and message the caller sees for ``exc`` raised while serving
    ``where``.

    Domain errors keep their message. Anything else (including a ShipyardError missing
    from the table) is 500 with :data:`INTERNAL_MESSAGE`; its traceback is logged at ERROR
    with the same reference, and nothing of it reaches the caller.
    """
    if isinstance(exc, ShipyardError):
        status = _lookup(exc)
        if status is not None:
            return status.http, exc.message
    return 500, _internal(exc, where)


def grpc_status_for_exception(
    exc: BaseException, *, where: str = ""
) -> tuple[grpc.StatusCode, int, str]:
    """The gRPC code, the equivalent HTTP status (for metrics) and the message for ``exc``;
    like :func:`http_status_for_exception`, a bug is INTERNAL with a generic message."""
    if isinstance(exc, ShipyardError):
        status = _lookup(exc)
        if status is not None:
            return status.grpc, status.http, exc.message
    return grpc.StatusCode.INTERNAL, 500, _internal(exc, where)


def error_for_upstream_status(status: int, message: str) -> ShipyardError:
    """The domain error a model server's non-2xx answer stands for (the table read
    backwards): 400 → InvalidArgument, 404 → NotFound, 504 → UpstreamTimeout, ...; another
    4xx is the caller's mistake (InvalidArgument), another 5xx a failed model (ModelFailed).
    """
    cls = _CLASS_BY_HTTP.get(status)
    if cls is None:
        cls = BadRequest if status < 500 else ModelFailed
    error = cls.__new__(cls)
    # The classes compose their messages differently; the model server's is used as is.
    ShipyardError.__init__(error, message)
    if isinstance(error, InvalidArgument):
        error.field = ""
    if isinstance(error, DeploymentStopped):
        error.deployment = ""
    return error


def status_class(status: int) -> str:
    """The metrics class of an HTTP status: ``2xx`` (anything below 400: not an error),
    ``4xx`` or ``5xx``."""
    if status < 400:
        return "2xx"
    return "4xx" if status < 500 else "5xx"


def http_reason(status: int) -> str:
    """``NOT_FOUND`` for 404: the Seldon ``reason`` of an error with that status."""
    try:
        return HTTPStatus(status).phrase.upper().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "ERROR"
