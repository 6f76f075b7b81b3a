"""The whole Shipyard suite on one machine (``shipyard up`` / ``down`` / ``status``).

See :mod:`shipyard_platform.supervisor` for the files under the Shipyard home and
:mod:`shipyard_platform.config` for the environment variables (ports, external NATS and
PostgreSQL, which services to run).
"""

from shipyard_platform.config import SERVICES, PlatformConfig, ServiceSpec, default_services
from shipyard_platform.supervisor import (
    ComponentStatus,
    PlatformError,
    down,
    read_state,
    running,
    status,
    up,
)

__all__ = [
    "SERVICES",
    "ComponentStatus",
    "PlatformConfig",
    "PlatformError",
    "ServiceSpec",
    "default_services",
    "down",
    "read_state",
    "running",
    "status",
    "up",
]
