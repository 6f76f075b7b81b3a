"""Health checks for the platform's components. Each returns ``(healthy, detail)``."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


def grpc_health(address: str, timeout: float = 1.0) -> tuple[bool, str]:
    """``grpc.health.v1.Health/Check`` with service ``""`` on ``host:port``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        name = code.name if code is not None else "error"
        return False, f"health check failed: {name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def nats_health(url: str, timeout: float = 1.0) -> tuple[bool, str]:
    """Connects to NATS and reads its ``INFO`` greeting (the first thing a server sends)."""
    parts = urlsplit(url.split(",")[0])
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            greeting = sock.recv(4096)
    except OSError as exc:
        return False, f"cannot connect to {host}:{port}: {exc}"
    if not greeting.startswith(b"INFO "):
        return False, f"{host}:{port} does not speak NATS"
    return True, "accepting connections"


def postgres_health(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    """Connects to PostgreSQL and runs ``SELECT 1``."""

    async def check() -> None:
        import asyncpg

        conn = await asyncpg.connect(url, timeout=timeout)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    try:
        run_coroutine(check())
    except Exception as exc:
        return False, f"cannot query: {type(exc).__name__}: {exc}"
    return True, "accepting connections"


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine to completion from synchronous code, even when the calling thread
    already runs an event loop (an async test calling ``status``): in a worker thread."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="shipyard-platform-check")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
