"""Runs the keys service.

``python -m shipyard_keys`` (or ``... serve``) serves gRPC (IdentityService and
ClientKeyService) until SIGTERM.
``python -m shipyard_keys bootstrap-admin --name admin`` creates the first admin and
prints one JSON line on stdout (the token is in it: stdout is for the caller only; logs go
to stderr). It writes the event store directly, so it works whether or not the server
runs, and it is safe to run any number of times, concurrently too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from shipyard.keys.v1 import client_keys_pb2_grpc, identity_pb2_grpc
from shipyard_core import db
from shipyard_core.auth import Authenticator, InternalTokenAuthenticator
from shipyard_core.errors import InvalidArgument, ShipyardError
from shipyard_core.eventstore import EventStore, ensure_schema
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.logs import configure_logging
from shipyard_core.service import EventSourcedService
from shipyard_core.telemetry import configure_tracing
from shipyard_keys.adapters import DeploymentDirectory, SchedulerDeployments
from shipyard_keys.api import PUBLIC_METHODS, ClientKeyServicer, IdentityServicer
from shipyard_keys.app import (
    BootstrapOutcome,
    ClientKeyCommands,
    ClientKeyQueries,
    IdentityCommands,
    IdentityQueries,
    KeyUsage,
    ReadYourWrites,
    ensure_usage_table,
)
from shipyard_keys.projections import (
    SCHEMA,
    ClientKeysProjection,
    DeploymentOwnersProjection,
    IdentityProjection,
)
from shipyard_keys.settings import KeysSettings


async def build(
    settings: KeysSettings,
    *,
    authenticator: Authenticator | None = None,
    deployments: DeploymentDirectory | None = None,
) -> ServiceHost:
    """The service, ready to start (tests start it on port 0).

    Callers are authenticated against the service's own ``identity`` projection (no
    gRPC call to itself, no cache: a revocation holds at once here), and the installation's
    internal token (``settings.internal_token``, the gateway's credential for
    VerifyClientKey) is recognised too. ``authenticator`` replaces the identity projection
    (tests use a fixed token table); ``deployments`` replaces the scheduler at
    ``settings.scheduler_addr`` as the source of deployments' groups."""
    svc = EventSourcedService(
        settings,
        SCHEMA,
        [IdentityProjection(), ClientKeysProjection(), DeploymentOwnersProjection()],
        pool_size=settings.database_pool_size,
    )
    await svc.open()
    async with svc.pool.acquire() as conn:
        await ensure_usage_table(conn)
    queries = IdentityQueries(svc.pool)
    commands = IdentityCommands(
        svc.pool, svc.store, queries, projection_wait_seconds=settings.projection_wait_seconds
    )
    local: Authenticator = queries if authenticator is None else authenticator
    if settings.internal_token:
        local = InternalTokenAuthenticator(local, settings.internal_token)
    host = ServiceHost(settings, authenticator=local, public_methods=PUBLIC_METHODS)
    host.add_servicer(
        identity_pb2_grpc.add_IdentityServiceServicer_to_server,
        IdentityServicer(commands, queries),
    )
    if deployments is None:
        scheduler = SchedulerDeployments(
            settings.scheduler_addr, timeout_seconds=settings.scheduler_timeout_seconds
        )
        host.add_close_hook(scheduler.close)
        deployments = scheduler
    key_queries = ClientKeyQueries(svc.pool, deployments, KeyUsage(svc.pool))
    key_commands = ClientKeyCommands(
        svc.store,
        key_queries,
        deployments,
        ReadYourWrites(svc.pool, svc.store, settings.projection_wait_seconds, ClientKeysProjection),
    )
    host.add_servicer(
        client_keys_pb2_grpc.add_ClientKeyServiceServicer_to_server,
        ClientKeyServicer(key_commands, key_queries),
    )
    svc.attach(host)
    return host


async def serve(settings: KeysSettings) -> int:
    """Runs until SIGTERM; returns the exit code."""
    configure_tracing(settings.service_name, settings.otlp_endpoint)
    host = await build(settings)
    return await host.run()


async def bootstrap_admin(settings: KeysSettings, name: str) -> BootstrapOutcome:
    """Creates the first admin ``name`` (once ever) straight in the event store."""
    pool = await db.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await ensure_schema(conn, SCHEMA)
        queries = IdentityQueries(pool)
        commands = IdentityCommands(
            pool,
            EventStore(pool, SCHEMA),
            queries,
            projection_wait_seconds=settings.projection_wait_seconds,
        )
        return await commands.bootstrap_admin(name)
    finally:
        await pool.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shipyard_keys",
        description="Shipyard keys service: users, groups, API tokens and deployment client keys.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="serve gRPC until SIGTERM (the default)")
    boot = commands.add_parser(
        "bootstrap-admin",
        help="create the first admin and print one JSON line with their token",
        description="Creates the first admin user once; later runs print "
        '{"created": false, "user": ...}. Reads SHIPYARD_DATABASE_URL.',
    )
    boot.add_argument("--name", default="admin", help="the admin's user name (default: admin)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point; exits with the process's status."""
    args = _parser().parse_args(argv)
    settings = KeysSettings()
    configure_logging(settings)
    if args.command == "bootstrap-admin":
        try:
            outcome = asyncio.run(bootstrap_admin(settings, args.name))
        except InvalidArgument as exc:
            print(f"bootstrap-admin: {exc.message}", file=sys.stderr)
            raise SystemExit(2) from None
        except ShipyardError as exc:
            print(f"bootstrap-admin: {exc.message}", file=sys.stderr)
            raise SystemExit(1) from None
        except OSError as exc:
            print(
                f"bootstrap-admin: cannot reach PostgreSQL (SHIPYARD_DATABASE_URL): {exc}",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        print(json.dumps(outcome.to_json()), flush=True)
        raise SystemExit(0)
    raise SystemExit(asyncio.run(serve(settings)))
