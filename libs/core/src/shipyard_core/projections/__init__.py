"""Read models fed by events: projections, their runner, and replay."""

from shipyard_core.projections.base import Projection, Statement, Tables
from shipyard_core.projections.replay import ReplayResult, replay_projection
from shipyard_core.projections.runner import ConsumerLag, ProjectionRunner

__all__ = [
    "ConsumerLag",
    "Projection",
    "ProjectionRunner",
    "ReplayResult",
    "Statement",
    "Tables",
    "replay_projection",
]
