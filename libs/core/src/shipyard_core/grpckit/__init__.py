"""Shipyard's gRPC kit: the error table, the interceptors and the service host.

Servicers stay thin: they translate protobuf to calls on transport-neutral handlers and
back, raise domain errors (``shipyard_core.errors``), and read the caller from
``shipyard_core.auth.current_principal()``. Everything else (tracing, authentication,
status codes, health, reflection, graceful shutdown) happens here.
"""

from shipyard_core.grpckit.errors import (
    ERROR_STATUS,
    INTERNAL_MESSAGE,
    error_from_rpc,
    error_from_status,
    status_for_error,
    status_for_exception,
)
from shipyard_core.grpckit.interceptors import (
    ALWAYS_PUBLIC_PREFIXES,
    MISSING_TOKEN_MESSAGE,
    ServerInterceptor,
    TracingClientInterceptor,
    bearer_metadata,
    bearer_token,
    is_public_method,
)
from shipyard_core.grpckit.server import BackgroundTask, CloseHook, ServiceHost

__all__ = [
    "ALWAYS_PUBLIC_PREFIXES",
    "ERROR_STATUS",
    "INTERNAL_MESSAGE",
    "MISSING_TOKEN_MESSAGE",
    "BackgroundTask",
    "CloseHook",
    "ServerInterceptor",
    "ServiceHost",
    "TracingClientInterceptor",
    "bearer_metadata",
    "bearer_token",
    "error_from_rpc",
    "error_from_status",
    "is_public_method",
    "status_for_error",
    "status_for_exception",
]
