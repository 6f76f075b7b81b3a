"""THE table from domain errors to gRPC status codes, and back.

Servers: :func:`status_for_exception` turns whatever a handler raised into the status and
message the caller sees. A :class:`~shipyard_core.errors.ShipyardError` keeps its message
(it is written for the caller); anything else is a bug and becomes INTERNAL with a generic
message and a reference id, while the traceback goes to the log under that reference.

Clients: :func:`error_from_rpc` turns an ``AioRpcError`` back into the domain error, so a
service calling another one can re-raise what it got and its own caller sees the same
status and message::

    try:
        await quota.Reserve(request)
    except grpc.aio.AioRpcError as err:
        raise error_from_rpc(err) from err
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from types import MappingProxyType

import asyncpg
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
    "INTERNAL_MESSAGE",
    "error_from_rpc",
    "error_from_status",
    "status_for_error",
    "status_for_exception",
]

log = logging.getLogger(__name__)

# The one table. Subclasses of these map like their base (see `status_for_error`).
ERROR_STATUS: Mapping[type[ShipyardError], grpc.StatusCode] = MappingProxyType(
    {
        InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        NotFound: grpc.StatusCode.NOT_FOUND,
        AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
        FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
        ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
        PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
        Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
        Unavailable: grpc.StatusCode.UNAVAILABLE,
        ConcurrencyError: grpc.StatusCode.ABORTED,
    }
)

_ERROR_BY_STATUS: Mapping[grpc.StatusCode, type[ShipyardError]] = {
    code: cls for cls, code in ERROR_STATUS.items()
}

INTERNAL_MESSAGE = "internal error; see the service log, reference {reference}"
"""What a caller sees for an error that is not a ShipyardError (a bug)."""

_CONCURRENCY_RE = re.compile(
    r"stream (?P<stream>\S+) changed concurrently \(expected version (?P<version>-?\d+)\)"
)


def status_for_error(error: ShipyardError) -> grpc.StatusCode | None:
    """The status code of a domain error, looked up along its class hierarchy (so a
    subclass of NotFound is NOT_FOUND); None for a ShipyardError outside the table."""
    for cls in type(error).__mro__:
        code = ERROR_STATUS.get(cls)
        if code is not None:
            return code
    return None


OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)
"""Exceptions that mean a dependency (the database, the broker) is unreachable."""

OUTAGE_MESSAGE = "a dependency of this service is unavailable right now; retry shortly"


def status_for_exception(exc: BaseException, *, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status and message the caller sees for ``exc`` raised while serving ``method``.

    Domain errors keep their message. Anything else (including a ShipyardError missing
    from the table) is INTERNAL with :data:`INTERNAL_MESSAGE`; its traceback is logged at
    ERROR with the same reference, and nothing of it reaches the caller.
    """
    if isinstance(exc, ShipyardError):
        code = status_for_error(exc)
        if code is not None:
            return code, exc.message
    if isinstance(exc, OUTAGE_ERRORS):
        # Not the caller's fault and not a bug: a dependency is down. UNAVAILABLE tells
        # clients to retry; the detail stays in the log.
        log.warning("%s in %s: %s", type(exc).__name__, method or "a call", exc)
        return grpc.StatusCode.UNAVAILABLE, OUTAGE_MESSAGE
    reference = uuid.uuid4().hex[:12]
    log.error(
        "unhandled %s in %s; reference %s",
        type(exc).__name__,
        method or "a call",
        reference,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"reference": reference, "rpc_method": method},
    )
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(reference=reference)


def _rebuild(cls: type[ShipyardError], message: str) -> ShipyardError:
    """An instance of ``cls`` whose message is exactly ``message``.

    InvalidArgument and ConcurrencyError compose their message from parts in __init__;
    the wire carries only the composed text, so they are rebuilt around it and their
    attributes recovered from it where the text allows.
    """
    error = cls.__new__(cls)
    ShipyardError.__init__(error, message)
    if isinstance(error, InvalidArgument):
        field, sep, _ = message.partition(": ")
        error.field = field if sep else ""
    elif isinstance(error, ConcurrencyError):
        match = _CONCURRENCY_RE.search(message)
        error.stream_id = match["stream"] if match else ""
        error.expected_version = int(match["version"]) if match else -1
    return error


def error_from_status(code: grpc.StatusCode, details: str) -> ShipyardError:
    """The domain error for a status and its details (see :func:`error_from_rpc`)."""
    details = details or code.name
    cls = _ERROR_BY_STATUS.get(code)
    if cls is not None:
        return _rebuild(cls, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # The callee may still be working; from here it is unavailable, and a later retry
        # may succeed.
        return Unavailable(f"deadline exceeded: {details}")
    # INTERNAL, UNKNOWN, UNIMPLEMENTED, CANCELLED, DATA_LOSS, OUT_OF_RANGE: a plain
    # ShipyardError, which is outside the table, so re-raising it makes this service
    # answer INTERNAL too, with the callee's details (and reference) in this service's log.
    return ShipyardError(f"{code.name}: {details}")


def error_from_rpc(error: grpc.RpcError) -> ShipyardError:
    """The domain error an ``AioRpcError`` (or sync ``grpc.RpcError`` call) stands for:
    NOT_FOUND gives NotFound with the same message, and so on through the table;
    DEADLINE_EXCEEDED gives Unavailable; other codes a plain ShipyardError (which a server
    answers as INTERNAL)."""
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = details_of() if callable(details_of) else str(error)
    return error_from_status(code, details or "")
