"""The gRPC face of the logging service."""

from shipyard_logging.api.metrics import MetricsApi
from shipyard_logging.api.servicer import LogApi

__all__ = ["LogApi", "MetricsApi"]
