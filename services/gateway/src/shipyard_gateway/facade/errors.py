"""THE table from gRPC status codes to HTTP statuses for the REST facade, and the JSON
error every failure is answered with.

Every error body is ``{"error": {"code": "NOT_FOUND", "message": "...", "field": "..."}}``:
``code`` is the gRPC status name (or, for refusals the facade makes itself before any
call, the closest one: ``INVALID_ARGUMENT``, ``UNAUTHENTICATED``, ``NOT_FOUND``, plus
``METHOD_NOT_ALLOWED`` and ``PAYLOAD_TOO_LARGE`` which gRPC has no word for); ``message``
is the service's own message, written for the caller; ``field`` names the offending
field when the facade itself refused a parameter or the body.

Choices where more than one status would do (docs/decisions record them too):

- FAILED_PRECONDITION → 409: the resource's current state conflicts with the request
  (delete an image a deployment uses, start a deployment that runs). 412 is about
  conditional request headers (If-Match), which this API does not use.
- RESOURCE_EXHAUSTED → 409: in the control plane it means a group quota refuses the
  request. That is a conflict with the group's current reservations, not a rate limit:
  429 would make HTTP clients retry with backoff, which cannot help until someone frees
  resources. The ``code`` field still says RESOURCE_EXHAUSTED.
- UNIMPLEMENTED → 501: an operation the service at the other end does not serve (yet),
  e.g. client keys on a keys service that predates them. Still a 5xx, with a generic
  message.
- Everything else that is not a caller's mistake (INTERNAL, UNKNOWN, DATA_LOSS,
  CANCELLED, a bug in the facade) → 500 with a generic message and a reference id; the
  details are logged under that reference and never sent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import grpc
from aiohttp import web

__all__ = [
    "HTTP_STATUS_FOR_GRPC",
    "INTERNAL_MESSAGE",
    "FacadeError",
    "error_for_rpc",
    "error_response",
    "internal_error",
]

log = logging.getLogger(__name__)

# The one table. Codes missing here (INTERNAL, UNKNOWN, DATA_LOSS, CANCELLED, OK) are
# 500 with a generic message: see `error_for_rpc`.
HTTP_STATUS_FOR_GRPC: Mapping[grpc.StatusCode, int] = MappingProxyType(
    {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.OUT_OF_RANGE: 400,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.ABORTED: 409,
        grpc.StatusCode.FAILED_PRECONDITION: 409,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 409,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    }
)

INTERNAL_MESSAGE = "internal error; see the gateway log, reference {reference}"
"""What a caller sees for a failure that is nobody's fault but ours."""

# Statuses whose service message is passed on verbatim: the services write those for the
# caller. For 501/503/504 the facade says it in its own words (the service's text may be
# a transport detail such as "failed to connect to all addresses; last error: ...").
_VERBATIM = frozenset({400, 401, 403, 404, 409})


class FacadeError(Exception):
    """A refusal the facade answers with ``status`` and the JSON error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            error["field"] = self.field
        return {"error": error}


def internal_error(where: str, detail: object = None) -> FacadeError:
    """A 500 with a generic message; ``detail`` (an exception or text) is logged under a
    fresh reference id and goes nowhere else."""
    reference = uuid.uuid4().hex[:12]
    exc_info = detail if isinstance(detail, BaseException) else None
    log.error(
        "REST facade: internal error in %s (reference %s): %s",
        where,
        reference,
        detail,
        exc_info=exc_info,
        extra={"reference": reference},
    )
    return FacadeError(500, "INTERNAL", INTERNAL_MESSAGE.format(reference=reference))


def error_for_rpc(err: grpc.RpcError, *, service: str, method: str) -> FacadeError:
    """The HTTP error a failed gRPC call to ``service``'s ``method`` is answered with."""
    code_of = getattr(err, "code", None)
    details_of = getattr(err, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = (details_of() if callable(details_of) else "") or ""
    status = HTTP_STATUS_FOR_GRPC.get(code)
    if status is None:
        return internal_error(f"{service}.{method}", f"{code.name}: {details}")
    if status in _VERBATIM:
        return FacadeError(status, code.name, details or code.name.lower().replace("_", " "))
    # The transport's own wording stays in the log; the caller gets what to do.
    log.warning("REST facade: %s.%s answered %s: %s", service, method, code.name, details)
    if status == 501:
        message = f"the {service} service does not serve {method} (yet); upgrade it"
    elif status == 504:
        message = f"the {service} service did not answer {method} in time; retry shortly"
    else:
        message = f"the {service} service is unavailable right now; retry shortly"
    return FacadeError(status, code.name, message)


def error_response(error: FacadeError) -> web.Response:
    """The JSON response for ``error`` (with ``WWW-Authenticate`` on 401)."""
    all_headers = dict(error.headers)
    if error.status == 401:
        all_headers.setdefault("WWW-Authenticate", 'Bearer realm="shipyard"')
    return web.json_response(error.body(), status=error.status, headers=all_headers or None)
