"""Read models of the keys service."""

from shipyard_keys.projections.client_keys import (
    SCHEDULER_SCHEMA,
    ClientKeysProjection,
    DeploymentOwnersProjection,
)
from shipyard_keys.projections.identity import SCHEMA, IdentityProjection

__all__ = [
    "SCHEDULER_SCHEMA",
    "SCHEMA",
    "ClientKeysProjection",
    "DeploymentOwnersProjection",
    "IdentityProjection",
]
