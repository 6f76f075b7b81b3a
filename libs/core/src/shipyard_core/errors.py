"""One exception tree for every Shipyard service.

Domain code raises these; the gRPC kit maps them to status codes in one table
(``shipyard_core.grpckit.errors``), and the REST facade to HTTP statuses. Anything
that is not a ``ShipyardError`` is a bug: callers see INTERNAL with a generic message
and the details go to the log, never to the caller.
"""

from __future__ import annotations


class ShipyardError(Exception):
    """Base of every error a caller may see. The message is shown to the caller as is,
    so it must say what is wrong and how to fix it, and never leak internals."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ShipyardError):
    """The request itself is wrong. Names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        text = f"{field}: {problem}"
        if fix:
            text += f" ({fix})"
        super().__init__(text)
        self.field = field


class NotFound(ShipyardError):
    """The named thing does not exist (or the caller may not know that it does)."""


class AlreadyExists(ShipyardError):
    """A create named something that exists already."""


class FailedPrecondition(ShipyardError):
    """The system is not in a state where the command can run (e.g. delete an image in use)."""


class ResourceExhausted(ShipyardError):
    """A quota or limit refuses the request; the message says what was asked and what is free."""


class PermissionDenied(ShipyardError):
    """The caller is known but may not do this."""


class Unauthenticated(ShipyardError):
    """No valid credentials came with the call."""


class Unavailable(ShipyardError):
    """A dependency is down; retrying later may succeed."""


class ConcurrencyError(ShipyardError):
    """Another writer appended to the stream first (optimistic concurrency check).

    Command handlers retry on it a bounded number of times; a caller that still sees it
    gets ABORTED and may retry."""

    def __init__(self, stream_id: str, expected_version: int) -> None:
        super().__init__(
            f"stream {stream_id} changed concurrently (expected version {expected_version}); retry"
        )
        self.stream_id = stream_id
        self.expected_version = expected_version
