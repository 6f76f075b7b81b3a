"""A ServiceHost run as its own process by test_grpckit's SIGTERM test (not collected).

Protocol on stdout, one line each: ``PORT <n>`` once serving, ``STARTED`` when the slow
call is in flight, ``BACKGROUND STOPPED`` and ``CLOSED`` during shutdown. The slow call
finishes only once shutdown has begun, so it is in flight when SIGTERM arrives.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc

from shipyard_core.auth import Principal
from shipyard_core.grpckit import ServiceHost
from shipyard_core.logs import configure_logging
from shipyard_core.settings import CommonSettings


class _Settings(CommonSettings):
    service_name: str = "graceful-test"
    grpc_port: int = 0


class _NoTokens:
    async def authenticate(self, token: str) -> Principal:
        raise AssertionError("only public methods here")


def _say(line: str) -> None:
    print(line, flush=True)


async def main() -> int:
    settings = _Settings(shutdown_grace_seconds=20)
    configure_logging(settings)
    host = ServiceHost(settings, authenticator=_NoTokens(), public_methods=["/test.v1.Slow/"])

    async def slow(request: Any, context: Any) -> Any:
        _say("STARTED")
        await host.stopping.wait()
        return {"finished": request["n"]}

    async def background(stop: asyncio.Event) -> None:
        await stop.wait()
        _say("BACKGROUND STOPPED")

    host.add_generic_handler(
        grpc.method_handlers_generic_handler(
            "test.v1.Slow",
            {
                "Work": grpc.unary_unary_rpc_method_handler(
                    slow,
                    request_deserializer=json.loads,
                    response_serializer=lambda value: json.dumps(value).encode(),
                )
            },
        )
    )
    host.add_background("waiter", background)
    host.add_close_hook(lambda: _say("CLOSED"))
    port = await host.start()
    _say(f"PORT {port}")
    return await host.run()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
