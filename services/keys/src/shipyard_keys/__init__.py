"""The keys service: who may call Shipyard.

This package holds its identity part: users, their API tokens, groups and membership
(``shipyard.keys.v1.IdentityService``). Deployment client keys join it later.

Reading order: ``api/`` (gRPC servicer) → ``app/`` (command and query handlers, given the
caller's Principal) → ``domain/`` (aggregates and their events) with ``projections/``
(the ``identity`` read model) beside it; ``main.py`` wires the process.
"""
