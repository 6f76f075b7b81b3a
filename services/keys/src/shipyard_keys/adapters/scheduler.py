"""Which group owns a deployment, according to the scheduler (which owns deployments).

Creating a client key asks ``SchedulerService.GetDeployment`` with the caller's *own*
token, so the scheduler applies its own visibility rule to the person acting: a member of
group B asking about group A's deployment gets NOT_FOUND, exactly as from ``shipyard
deploy show``, and the keys service learns nothing it could leak.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from shipyard.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from shipyard_core.errors import NotFound, ShipyardError, Unauthenticated, Unavailable
from shipyard_core.grpckit import TracingClientInterceptor, bearer_metadata, error_from_rpc


def deployment_not_found(deployment: str) -> NotFound:
    """The one answer for a deployment that does not exist or is not the caller's (the
    scheduler's own wording, so both services read the same)."""
    return NotFound(f"deployment {deployment!r} does not exist; see `shipyard deploy list`")


class DeploymentDirectory(Protocol):
    """Answers which group owns a deployment, as seen by the holder of ``token``."""

    async def deployment_group(self, token: str, deployment: str) -> str:
        """The group owning ``deployment``. Raises NotFound when it does not exist or the
        token's holder may not see it, Unavailable when the answer cannot be had now."""
        ...


class SchedulerDeployments:
    """:class:`DeploymentDirectory` over the scheduler's gRPC API at ``address`` (the
    channel opens on first use, inside the running loop)."""

    def __init__(self, address: str, *, timeout_seconds: float = 10.0) -> None:
        self.address = address
        self.timeout_seconds = timeout_seconds
        self._channel: grpc.aio.Channel | None = None
        self._stub: scheduler_pb2_grpc.SchedulerServiceStub | None = None

    def _ensure_stub(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.address, interceptors=[TracingClientInterceptor()]
            )
            self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        return self._stub

    async def deployment_group(self, token: str, deployment: str) -> str:
        """The group owning ``deployment``, asked with the caller's own ``token``."""
        stub = self._ensure_stub()
        try:
            answer = await stub.GetDeployment(
                scheduler_pb2.DeploymentRef(name=deployment),
                metadata=bearer_metadata(token),
                timeout=self.timeout_seconds,
            )
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise deployment_not_found(deployment) from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                # The token passed here and failed there: revoked in between, or the two
                # services disagree on the internal token. Say which service refused.
                raise Unauthenticated(
                    f"the scheduler refused the caller's token ({err.details()})"
                ) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    f"the scheduler service at {self.address} is unavailable "
                    f"({err.details()}); nothing was changed, retry in a moment"
                ) from None
            error: ShipyardError = error_from_rpc(err)
            raise error from None
        group: str = answer.group
        return group

    async def close(self) -> None:
        """Closes the channel (if one was opened)."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
