"""QuotaService over gRPC: a thin layer from protobuf to ``QuotaApp`` and back.

Errors are domain exceptions; the kit's interceptor maps them to status codes."""

from __future__ import annotations

from typing import Any

from shipyard.quota.v1 import quota_pb2, quota_pb2_grpc
from shipyard_core.auth import current_principal
from shipyard_quota.api import converters as cv
from shipyard_quota.app import QuotaApp


class QuotaApi(quota_pb2_grpc.QuotaServiceServicer):
    """The gRPC face of the quota service."""

    def __init__(self, app: QuotaApp) -> None:
        self.app = app

    async def SetInstanceType(
        self, request: quota_pb2.SetInstanceTypeRequest, context: Any
    ) -> quota_pb2.InstanceType:
        it = request.instance_type
        view = await self.app.set_instance_type(
            current_principal(),
            it.name,
            cpu=it.cpu,
            memory_gib=it.memory_gib,
            gpu=it.gpu,
            description=it.description,
        )
        return cv.instance_type(view)

    async def ListInstanceTypes(
        self, request: quota_pb2.ListInstanceTypesRequest, context: Any
    ) -> quota_pb2.ListInstanceTypesResponse:
        views = await self.app.list_instance_types(current_principal())
        return quota_pb2.ListInstanceTypesResponse(
            instance_types=[cv.instance_type(v) for v in views]
        )

    async def SetGroupQuota(
        self, request: quota_pb2.SetGroupQuotaRequest, context: Any
    ) -> quota_pb2.GroupUsage:
        limits = cv.amount(request.limits, "limits")
        view = await self.app.set_group_quota(current_principal(), request.group, limits)
        return cv.group_usage(view)

    async def GetGroupUsage(
        self, request: quota_pb2.GetGroupUsageRequest, context: Any
    ) -> quota_pb2.GroupUsage:
        return cv.group_usage(await self.app.group_usage(current_principal(), request.group))

    async def ListGroupUsage(
        self, request: quota_pb2.ListGroupUsageRequest, context: Any
    ) -> quota_pb2.ListGroupUsageResponse:
        views = await self.app.list_group_usage(current_principal())
        return quota_pb2.ListGroupUsageResponse(groups=[cv.group_usage(v) for v in views])

    async def Reserve(
        self, request: quota_pb2.ReserveRequest, context: Any
    ) -> quota_pb2.Reservation:
        r = await self.app.reserve(
            current_principal(),
            request.group,
            request.reservation_id,
            request.deployment,
            request.instance_type,
            request.instances,
        )
        return cv.reservation(r)

    async def Release(
        self, request: quota_pb2.ReleaseRequest, context: Any
    ) -> quota_pb2.ReleaseResponse:
        released = await self.app.release(
            current_principal(), request.group, request.reservation_id
        )
        return quota_pb2.ReleaseResponse(released=released)
