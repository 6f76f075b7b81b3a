"""The logging service's use cases: ingesting LOGS, and reading logs for a caller."""

from shipyard_logging.app.ingest import DURABLE, Ingester, IngestStats
from shipyard_logging.app.queries import (
    LineView,
    LogQueries,
    SourceView,
    build_not_found,
    deployment_not_found,
)

__all__ = [
    "DURABLE",
    "IngestStats",
    "Ingester",
    "LineView",
    "LogQueries",
    "SourceView",
    "build_not_found",
    "deployment_not_found",
]
