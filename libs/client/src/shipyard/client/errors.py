"""The client's exception tree: one class per gRPC status code a caller can act on.

Every error the client raises is a :class:`ShipyardClientError`. Errors that come from a
server are built in one place, :func:`from_rpc_error`, which keeps the server's message
verbatim (the services already phrase it for people: what is wrong and how to fix it)
and only rewrites the low-level "could not connect" noise grpc produces on its own.
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc

SHIPYARD_UP_HINT = "is Shipyard running? `shipyard up`"


class ShipyardClientError(Exception):
    """Base of every error the client raises.

    ``code`` is the gRPC status name (``"NOT_FOUND"``, ...), ``message`` the human reason.
    ``str(error)`` is the message plus any hint, on one line, ready to show to a person.
    """

    default_code: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        service: str | None = None,
        method: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.code: str = code or self.default_code
        self.message: str = message
        self.service = service
        self.method = method
        self.hint = hint
        super().__init__(self._text())

    def _text(self) -> str:
        text = self.message or self.code.lower().replace("_", " ")
        if self.hint and self.hint not in text:
            text = f"{text} ({self.hint})"
        # A person reads this on one line (the CLI prints exactly one line per failure).
        return " ".join(text.split())

    def __str__(self) -> str:
        return self._text()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"

    def to_dict(self) -> dict[str, Any]:
        """The error as plain data (for ``--json`` consumers and logs)."""
        return {
            "code": self.code,
            "message": self.message,
            "service": self.service,
            "method": self.method,
            "hint": self.hint,
        }


class InvalidArgument(ShipyardClientError):
    """The request itself is wrong; the message names the field and the fix."""

    default_code = "INVALID_ARGUMENT"


class NotFound(ShipyardClientError):
    """The named thing does not exist (or the caller may not see it)."""

    default_code = "NOT_FOUND"


class AlreadyExists(ShipyardClientError):
    """A create named something that exists already."""

    default_code = "ALREADY_EXISTS"


class FailedPrecondition(ShipyardClientError):
    """The system is not in a state where the command can run."""

    default_code = "FAILED_PRECONDITION"


class QuotaExceeded(ShipyardClientError):
    """A quota or limit refused the request (RESOURCE_EXHAUSTED); the message says what
    was asked and what is free."""

    default_code = "RESOURCE_EXHAUSTED"


class PermissionDenied(ShipyardClientError):
    """The caller is known but may not do this."""

    default_code = "PERMISSION_DENIED"


class Unauthenticated(ShipyardClientError):
    """No valid token came with the call."""

    default_code = "UNAUTHENTICATED"


class Unavailable(ShipyardClientError):
    """The service (or one of its dependencies) cannot be reached; retrying later may work."""

    default_code = "UNAVAILABLE"

    def __init__(self, message: str, *, hint: str | None = SHIPYARD_UP_HINT, **kw: Any) -> None:
        super().__init__(message, hint=hint, **kw)


class DeadlineExceeded(Unavailable):
    """The call did not finish within its timeout. A kind of :class:`Unavailable`, so code
    that retries on unavailability retries on this too."""

    default_code = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, **kw: Any) -> None:
        kw.setdefault("hint", "the server may be overloaded; retry or raise the timeout")
        super().__init__(message, **kw)


class Conflict(ShipyardClientError):
    """Another writer changed the same thing first (ABORTED); the call may simply be retried."""

    default_code = "ABORTED"


class Unimplemented(ShipyardClientError):
    """The server does not offer this call (an older or different service at that address)."""

    default_code = "UNIMPLEMENTED"


class ServerError(ShipyardClientError):
    """The server failed (INTERNAL, UNKNOWN, DATA_LOSS, ...): a bug or an outage, not the
    caller's mistake."""

    default_code = "INTERNAL"


class ConfigError(ShipyardClientError):
    """The client's own configuration is unusable (unreadable config file, unknown service)."""

    default_code = "CLIENT_CONFIG"


_BY_CODE: dict[str, type[ShipyardClientError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "OUT_OF_RANGE": InvalidArgument,
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": AlreadyExists,
    "FAILED_PRECONDITION": FailedPrecondition,
    "RESOURCE_EXHAUSTED": QuotaExceeded,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAUTHENTICATED": Unauthenticated,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "ABORTED": Conflict,
    "UNIMPLEMENTED": Unimplemented,
    "INTERNAL": ServerError,
    "UNKNOWN": ServerError,
    "DATA_LOSS": ServerError,
    "CANCELLED": ServerError,
}

# What grpc itself says when no connection could be made. Such text is grpc's, not the
# server's, so it is replaced by a sentence naming the service and where it was looked for.
_CONNECT_FAILURE_MARKERS = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "dns resolution failed",
    "name resolution",
    "socket closed",
    "connection reset",
    "no route to host",
    "empty address list",
    "ssl handshake",
)


def error_class(code: str) -> type[ShipyardClientError]:
    """The exception class for a gRPC status name (``"NOT_FOUND"`` → :class:`NotFound`)."""
    return _BY_CODE.get(code, ServerError)


def from_rpc_error(
    err: grpc.RpcError,
    *,
    service: str,
    address: str,
    method: str,
    has_token: bool = True,
    timeout: float | None = None,
) -> ShipyardClientError:
    """Turns a failed gRPC call into the matching :class:`ShipyardClientError`.

    The one place where status codes become exceptions: keeps the server's message as
    is, and for failures grpc reports before any server spoke (no connection, deadline),
    writes a message naming the service and address instead.
    """
    status = err.code() if hasattr(err, "code") else None
    code: str = getattr(status, "name", None) or "UNKNOWN"
    details: str = (err.details() if hasattr(err, "details") else None) or ""
    cls = error_class(code)
    kw: dict[str, Any] = {"code": code, "service": service, "method": method}

    if cls is Unavailable:
        lowered = details.lower()
        if not details or any(marker in lowered for marker in _CONNECT_FAILURE_MARKERS):
            details = f"cannot reach the {service} service at {address}"
    elif cls is DeadlineExceeded:
        within = f" within {timeout:g}s" if timeout else ""
        details = f"the {service} service at {address} did not answer {method}{within}"
    elif cls is Unimplemented:
        details = (
            f"the server at {address} does not implement {method} "
            f"(is it the {service} service, and up to date?)"
        )
    elif cls is Unauthenticated and not has_token:
        kw["hint"] = "no token configured: pass --token, set SHIPYARD_TOKEN, or run `shipyard up`"
    return cls(details, **kw)
