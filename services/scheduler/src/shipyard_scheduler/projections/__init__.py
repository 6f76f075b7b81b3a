"""The scheduler's projections."""

from shipyard_scheduler.projections.deployments import (
    ROUTES_CHANNEL,
    SCHEMA,
    DeploymentsProjection,
)

__all__ = ["ROUTES_CHANNEL", "SCHEMA", "DeploymentsProjection"]
