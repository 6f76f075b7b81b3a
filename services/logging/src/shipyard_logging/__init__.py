"""The logging service: the log lines of deployments' instances and of image builds,
kept for a few days.

Lines arrive in batches on the JetStream ``LOGS`` stream (format in
``shipyard_core.logbatch``); one ingester (an advisory lock elects it among replicas)
writes them to day partitions of ``logging.lines`` and drops partitions past the
retention. Callers read the logs of deployments and builds of their groups: who owns a
deployment comes from the scheduler's events (``projections/``), a build's group from
its batches.

Reading order: ``api/`` (gRPC servicer) → ``app/`` (ingest, queries) → ``domain/`` (what
a query may ask) with ``adapters/`` (the tables) and ``projections/`` beside it;
``main.py`` wires the process.
"""
