"""The scheduler's gRPC API."""

from shipyard_scheduler.api.servicer import SchedulerApi

__all__ = ["SchedulerApi"]
