"""Command handlers, queries, the workers and the sweeper."""

from shipyard_asyncinference.app.commands import AsyncCommands
from shipyard_asyncinference.app.payloads import Blobs, ensure_blobs_table
from shipyard_asyncinference.app.queries import AsyncQueries
from shipyard_asyncinference.app.sweeper import Sweeper
from shipyard_asyncinference.app.views import RequestView, ResultView, Submission
from shipyard_asyncinference.app.worker import Worker

__all__ = [
    "AsyncCommands",
    "AsyncQueries",
    "Blobs",
    "RequestView",
    "ResultView",
    "Submission",
    "Sweeper",
    "Worker",
    "ensure_blobs_table",
]
