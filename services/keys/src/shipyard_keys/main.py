"""Runs the keys service.

``python -m shipyard_keys`` (or ``... serve``) serves gRPC until SIGTERM.
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

from shipyard.keys.v1 import identity_pb2_grpc
from shipyard_core import db
from shipyard_core.errors import InvalidArgument, ShipyardError
from shipyard_core.eventstore import EventStore, ensure_schema
from shipyard_core.grpckit.server import ServiceHost
from shipyard_core.logs import configure_logging
from shipyard_core.service import EventSourcedService
from shipyard_core.telemetry import configure_tracing
from shipyard_keys.api import PUBLIC_METHODS, IdentityServicer
from shipyard_keys.app import BootstrapOutcome, IdentityCommands, IdentityQueries
from shipyard_keys.projections import SCHEMA, IdentityProjection
from shipyard_keys.settings import KeysSettings


async def build(settings: KeysSettings) -> ServiceHost:
    """The service, ready to start (tests start it on port 0).

    Callers are authenticated against the service's own ``identity`` projection (no
    gRPC call to itself, no cache: a revocation holds at once here)."""
    svc = EventSourcedService(
        settings, SCHEMA, [IdentityProjection()], pool_size=settings.database_pool_size
    )
    await svc.open()
    queries = IdentityQueries(svc.pool)
    commands = IdentityCommands(
        svc.pool, svc.store, queries, projection_wait_seconds=settings.projection_wait_seconds
    )
    host = ServiceHost(settings, authenticator=queries, public_methods=PUBLIC_METHODS)
    host.add_servicer(
        identity_pb2_grpc.add_IdentityServiceServicer_to_server,
        IdentityServicer(commands, queries),
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
        description="Shipyard keys service: users, groups and API tokens.",
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
