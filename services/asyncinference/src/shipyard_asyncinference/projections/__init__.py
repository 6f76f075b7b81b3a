"""Read models of the async inference service."""

from shipyard_asyncinference.projections.batch import BatchJobsProjection
from shipyard_asyncinference.projections.requests import SCHEMA, AsyncRequestsProjection

__all__ = ["SCHEMA", "AsyncRequestsProjection", "BatchJobsProjection"]
