"""The gateway's client of the scheduler: the route stream and activation.

Both calls authenticate with the platform's internal token (``settings.internal_token``)
as ``authorization: Bearer <token>`` metadata; the scheduler's authenticator recognises it
(:class:`shipyard_core.auth.InternalTokenAuthenticator`) and lets the gateway, and only
Shipyard's own services (and admins), watch every deployment's routes.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from shipyard.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from shipyard_core.grpckit.errors import error_from_rpc
from shipyard_core.grpckit.interceptors import TracingClientInterceptor, bearer_metadata

__all__ = ["SchedulerClient"]

log = logging.getLogger(__name__)


class SchedulerClient:
    """``SchedulerService`` at ``addr``, called as the internal service.

    The channel is opened on first use, inside the running event loop (grpc.aio objects
    bind to it), and closed by :meth:`close`.
    """

    def __init__(self, addr: str, internal_token: str, *, activate_timeout: float = 10.0) -> None:
        self.addr = addr
        self.activate_timeout = activate_timeout
        self._metadata: tuple[tuple[str, str], ...] = (
            bearer_metadata(internal_token) if internal_token else ()
        )
        if not internal_token:
            log.warning(
                "no internal token (SHIPYARD_INTERNAL_TOKEN): the scheduler at %s will refuse "
                "the gateway's route stream",
                addr,
            )
        self._channel: Any = None
        self._stub: Any = None

    def _ensure_stub(self) -> Any:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.addr, interceptors=[TracingClientInterceptor()]
            )
            self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        return self._stub

    def watch_routes(self) -> Any:
        """Starts ``WatchRoutes`` and returns the call (a grpc.aio UnaryStreamCall: ``await
        call.read()`` gives RouteUpdates, then ``grpc.aio.EOF``; ``call.cancel()`` hangs up).
        """
        return self._ensure_stub().WatchRoutes(
            scheduler_pb2.WatchRoutesRequest(), metadata=self._metadata
        )

    async def activate(self, deployment: str, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Asks the scheduler to wake ``deployment`` (scaled to zero, a request waits).
        Returns whether it was asleep; raises the domain error of a failed call
        (NotFound, Unavailable, ...)."""
        stub = self._ensure_stub()
        try:
            answer = await stub.Activate(
                scheduler_pb2.ActivateRequest(deployment=deployment),
                metadata=self._metadata,
                timeout=self.activate_timeout if timeout is None else timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from err
        return bool(answer.activated)

    async def close(self) -> None:
        """Closes the channel (if one was opened)."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
