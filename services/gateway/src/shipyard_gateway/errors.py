"""The gateway's own errors, and THE table from domain errors to HTTP statuses.

The gateway reuses the :mod:`shipyard_core.errors` tree (NotFound, Unauthenticated, ...)
and adds the failures only a proxy has. Each new class subclasses the core error it is a
case of, so the gRPC kit's table (``shipyard_core.grpckit.errors``) already maps it for
the gRPC data plane (a timed-out model server is UNAVAILABLE there), while the HTTP table
below, which is looked up along the class hierarchy, can be more precise (504).

Transports call :func:`http_status_for_exception` and nothing else: a ShipyardError keeps
its message (it is written for the caller); anything else is a bug and becomes 500 with a
generic message and a reference id, the traceback going to the log under that reference.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from types import MappingProxyType

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
    "HTTP_STATUS",
    "INTERNAL_MESSAGE",
    "BadGateway",
    "DeploymentStopped",
    "PayloadTooLarge",
    "UpstreamTimeout",
    "http_status_for_error",
    "http_status_for_exception",
]

log = logging.getLogger(__name__)


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


class PayloadTooLarge(ResourceExhausted):
    """The request body is over ``max_body_bytes``."""


# The one table. Looked up along the class hierarchy, so the most specific class wins
# (UpstreamTimeout is 504 although it is an Unavailable, which is 503). Statuses follow
# the usual gRPC-to-HTTP mapping (google.rpc.Code).
HTTP_STATUS: Mapping[type[ShipyardError], int] = MappingProxyType(
    {
        InvalidArgument: 400,
        FailedPrecondition: 400,
        Unauthenticated: 401,
        PermissionDenied: 403,
        NotFound: 404,
        AlreadyExists: 409,
        ConcurrencyError: 409,
        PayloadTooLarge: 413,
        ResourceExhausted: 429,
        BadGateway: 502,
        Unavailable: 503,
        DeploymentStopped: 503,
        UpstreamTimeout: 504,
    }
)

INTERNAL_MESSAGE = "internal error in the gateway; see its log, reference {reference}"
"""What a caller sees for an error that is not a ShipyardError (a bug)."""


def http_status_for_error(error: ShipyardError) -> int | None:
    """The HTTP status of a domain error, looked up along its class hierarchy; None for a
    ShipyardError outside the table."""
    for cls in type(error).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return None


def http_status_for_exception(exc: BaseException, *, where: str = "") -> tuple[int, str]:
    """The status and message the caller sees for ``exc`` raised while serving ``where``.

    Domain errors keep their message. Anything else (including a ShipyardError missing
    from the table) is 500 with :data:`INTERNAL_MESSAGE`; its traceback is logged at ERROR
    with the same reference, and nothing of it reaches the caller.
    """
    if isinstance(exc, ShipyardError):
        status = http_status_for_error(exc)
        if status is not None:
            return status, exc.message
    reference = uuid.uuid4().hex[:12]
    log.error(
        "unhandled %s in %s; reference %s",
        type(exc).__name__,
        where or "a request",
        reference,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"reference": reference},
    )
    return 500, INTERNAL_MESSAGE.format(reference=reference)
