"""Read models the logging service keeps from other services' events."""

from shipyard_logging.projections.owners import SCHEMA, DeploymentLivesProjection

__all__ = ["SCHEMA", "DeploymentLivesProjection"]
