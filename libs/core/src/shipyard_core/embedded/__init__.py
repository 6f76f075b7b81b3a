"""Embedded infrastructure: NATS (JetStream) and PostgreSQL as local child processes.

Used by the test fixtures (``shipyard_testing``) and by ``shipyard up``. Synchronous on
purpose (plain subprocesses), so they work from pytest fixtures and from the CLI alike.
"""

from shipyard_core.embedded._process import free_port
from shipyard_core.embedded.nats import EmbeddedServerError, NatsProcess, start_nats
from shipyard_core.embedded.postgres import PostgresProcess, start_postgres

__all__ = [
    "EmbeddedServerError",
    "NatsProcess",
    "PostgresProcess",
    "free_port",
    "start_nats",
    "start_postgres",
]
