"""Edges of the keys service to other systems: the scheduler (who owns a deployment)."""

from shipyard_keys.adapters.scheduler import (
    DeploymentDirectory,
    SchedulerDeployments,
    deployment_not_found,
)

__all__ = ["DeploymentDirectory", "SchedulerDeployments", "deployment_not_found"]
