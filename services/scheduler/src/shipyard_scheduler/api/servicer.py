"""SchedulerService over gRPC: protobuf ↔ the app layer. No logic here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard.scheduler.v1 import scheduler_pb2_grpc
from shipyard_core.auth import current_principal
from shipyard_core.grpckit import bearer_token
from shipyard_scheduler.api import converters as cv
from shipyard_scheduler.app.commands import DeploymentCommands
from shipyard_scheduler.app.queries import DeploymentQueries
from shipyard_scheduler.app.routes import RouteHub


def _token(context: Any) -> str:
    """The caller's own token, forwarded to quota and imagebuild."""
    return bearer_token({k: v for k, v in context.invocation_metadata() or ()})


class SchedulerApi(scheduler_pb2_grpc.SchedulerServiceServicer):
    """The gRPC face of the scheduler."""

    def __init__(
        self, commands: DeploymentCommands, queries: DeploymentQueries, hub: RouteHub
    ) -> None:
        self.commands = commands
        self.queries = queries
        self.hub = hub

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: Any
    ) -> pb.Deployment:
        view = await self.commands.create(
            current_principal(),
            _token(context),
            request.name,
            request.group,
            cv.create_change(request.spec),
            request.readme,
        )
        return cv.deployment_out(view)

    async def UpdateDeployment(
        self, request: pb.UpdateDeploymentRequest, context: Any
    ) -> pb.Deployment:
        view = await self.commands.update(
            current_principal(),
            _token(context),
            request.name,
            cv.update_change(request),
            request.message,
        )
        return cv.deployment_out(view)

    async def StopDeployment(self, request: pb.DeploymentRef, context: Any) -> pb.Deployment:
        return cv.deployment_out(
            await self.commands.stop(current_principal(), _token(context), request.name)
        )

    async def StartDeployment(self, request: pb.DeploymentRef, context: Any) -> pb.Deployment:
        return cv.deployment_out(
            await self.commands.start(current_principal(), _token(context), request.name)
        )

    async def ScaleDeployment(
        self, request: pb.ScaleDeploymentRequest, context: Any
    ) -> pb.Deployment:
        scaling = cv.scaling_in(request.scaling, True)
        assert scaling is not None
        view = await self.commands.scale(
            current_principal(), _token(context), request.name, scaling
        )
        return cv.deployment_out(view)

    async def DeleteDeployment(
        self, request: pb.DeploymentRef, context: Any
    ) -> pb.DeleteDeploymentResponse:
        await self.commands.delete(current_principal(), _token(context), request.name)
        return pb.DeleteDeploymentResponse(name=request.name)

    async def GetDeployment(self, request: pb.DeploymentRef, context: Any) -> pb.Deployment:
        return cv.deployment_out(await self.queries.get(current_principal(), request.name))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: Any
    ) -> pb.ListDeploymentsResponse:
        views = await self.queries.list_deployments(
            current_principal(),
            search=request.search,
            group=request.group,
            status=cv.STATUS_NAMES.get(request.status, ""),
            mine=request.mine,
            include_deleted=request.include_deleted,
        )
        return pb.ListDeploymentsResponse(deployments=[cv.deployment_out(v) for v in views])

    async def GetHistory(self, request: pb.DeploymentRef, context: Any) -> pb.History:
        entries = await self.queries.history(current_principal(), request.name)
        return cv.history_out(request.name, entries)

    async def ListInstances(
        self, request: pb.ListInstancesRequest, context: Any
    ) -> pb.ListInstancesResponse:
        views = await self.queries.instances(current_principal(), request.name, request.limit)
        return pb.ListInstancesResponse(instances=[cv.instance_out(v) for v in views])

    async def GetReadme(self, request: pb.DeploymentRef, context: Any) -> pb.Readme:
        return cv.readme_out(await self.queries.readme(current_principal(), request.name))

    async def SetReadme(self, request: pb.SetReadmeRequest, context: Any) -> pb.Readme:
        view = await self.commands.set_readme(current_principal(), request.name, request.markdown)
        return cv.readme_out(view)

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: Any
    ) -> AsyncIterator[pb.RouteUpdate]:
        current_principal().require_internal("watching routes")
        async for view in self.hub.watch():
            yield cv.route_out(view)

    async def Activate(self, request: pb.ActivateRequest, context: Any) -> pb.ActivateResponse:
        current_principal().require_internal("activating a deployment")
        return pb.ActivateResponse(activated=await self.commands.activate(request.deployment))
