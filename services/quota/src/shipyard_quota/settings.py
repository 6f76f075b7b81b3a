"""Quota's settings (env prefix ``SHIPYARD_``)."""

from __future__ import annotations

from shipyard_core.settings import CommonSettings


class QuotaSettings(CommonSettings):
    """Settings of the quota service."""

    service_name: str = "quota"
    """The name in logs, traces and the NATS connection."""

    grpc_port: int = 50052
    """Port of the QuotaService gRPC API."""

    projection_wait_seconds: float = 5.0
    """How long a command waits for its effect to show in queries before answering."""
