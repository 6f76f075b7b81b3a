"""Configuration of the keys service (env prefix ``SHIPYARD_``)."""

from __future__ import annotations

from pydantic import Field

from shipyard_core.settings import CommonSettings


class KeysSettings(CommonSettings):
    """Settings of the keys service; the shared ones are documented on CommonSettings."""

    service_name: str = "keys"
    """Name of this service: ``keys``. Also its schema in PostgreSQL."""

    grpc_port: int = Field(default=50051, ge=0, le=65535)
    """Port the gRPC server binds to (``SHIPYARD_GRPC_PORT``); 0 lets the OS choose."""

    projection_wait_seconds: float = Field(default=5.0, gt=0)
    """How long a command whose effect callers rely on at once (CreateUser, IssueToken,
    RevokeToken, membership changes, bootstrap-admin with a server running,
    CreateClientKey, RevokeClientKey) waits for its read model to apply it before
    answering. On timeout a revocation or removal answers UNAVAILABLE (repeat it to
    confirm); commands that return a token or key answer anyway, since the secret is
    shown only once."""

    scheduler_addr: str = "127.0.0.1:50054"
    """``host:port`` of the scheduler (``SHIPYARD_SCHEDULER_ADDR``). Creating a client key
    asks it, with the caller's own token, which group owns the deployment (and whether
    the caller may see it); listing asks it when the caller sees no key."""

    scheduler_timeout_seconds: float = Field(default=10.0, gt=0)
    """Deadline of one call to the scheduler; past it the command answers UNAVAILABLE and
    changes nothing."""

    database_pool_size: int = Field(default=10, ge=1)
    """Most PostgreSQL connections the service's pool opens (commands, queries, and every
    incoming call's token check)."""
