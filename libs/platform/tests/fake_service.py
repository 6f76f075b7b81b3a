"""A stand-in Shipyard service for the platform tests.

``python fake_service.py`` serves gRPC health (SERVING) on ``$SHIPYARD_GRPC_PORT`` until
SIGTERM. ``python fake_service.py bootstrap-admin --name admin`` behaves like keys' command:
it records the admin in ``$SHIPYARD_DATABASE_URL`` and prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def bootstrap_admin(name: str) -> dict[str, object]:
    conn = await asyncpg.connect(os.environ["SHIPYARD_DATABASE_URL"])
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS fake_admin (name text PRIMARY KEY)")
        if await conn.fetchval("SELECT count(*) FROM fake_admin"):
            return {"created": False}
        await conn.execute("INSERT INTO fake_admin VALUES ($1)", name)
        return {"user": name, "token": f"sy_{secrets.token_hex(8)}", "created": True}
    finally:
        await conn.close()


def serve() -> None:
    # As the services' kit binds: without SO_REUSEPORT, so a taken port is an error.
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        server.add_insecure_port(f"127.0.0.1:{os.environ['SHIPYARD_GRPC_PORT']}")
    except RuntimeError:
        print("cannot bind the gRPC server (port in use?)", flush=True)
        sys.exit(1)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("fake service serving", flush=True)
    stop.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["bootstrap-admin"]:
        print("bootstrapping", file=sys.stderr)
        print(json.dumps(asyncio.run(bootstrap_admin(sys.argv[3]))))
    else:
        serve()
