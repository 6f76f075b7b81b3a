"""The services the scheduler asks before it decides: imagebuild (which pack or OCI
image an image reference means) and quota (instance types, reservations).

User commands forward the caller's own token, so those services apply their own
permission checks to the person acting (a member of group A cannot reserve in B through
the scheduler)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import grpc

from shipyard.imagebuild.v1 import imagebuild_pb2, imagebuild_pb2_grpc
from shipyard.quota.v1 import quota_pb2, quota_pb2_grpc
from shipyard_core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShipyardError,
    Unavailable,
)
from shipyard_core.grpckit import TracingClientInterceptor, bearer_metadata, error_from_rpc
from shipyard_scheduler.domain.events import IMAGE_KINDS, ImageKind


@dataclass(frozen=True)
class ResolvedImage:
    """An image version as a deployment records it."""

    name: str
    version: int
    digest: str
    pack_key: str
    """Object store key of the pack (empty for an OCI image)."""
    workers: int
    python: str
    kind: ImageKind = "pack"
    """``pack`` or ``oci`` (built on a cluster: only the kubernetes backend runs it)."""
    image_ref: str = ""
    """The OCI image pinned by digest; empty for a pack."""

    @property
    def ref(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class InstanceTypeInfo:
    """An instance type's resources per instance."""

    name: str
    cpu: float
    memory_gib: float
    gpu: int


def reservation_id(deployment: str) -> str:
    """One reservation per deployment, resized by every change (idempotent by id)."""
    return f"deployment:{deployment}"


class Peers:
    """gRPC clients of imagebuild and quota (channels opened on first use)."""

    def __init__(self, quota_addr: str, imagebuild_addr: str, *, timeout: float = 10.0) -> None:
        self.quota_addr = quota_addr
        self.imagebuild_addr = imagebuild_addr
        self.timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, addr: str) -> grpc.aio.Channel:
        if addr not in self._channels:
            self._channels[addr] = grpc.aio.insecure_channel(
                addr, interceptors=[TracingClientInterceptor()]
            )
        return self._channels[addr]

    async def _call(self, service: str, addr: str, method: Any, request: Any, token: str) -> Any:
        try:
            return await method(request, metadata=bearer_metadata(token), timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    f"the {service} service at {addr} is unavailable ({err.details()}); "
                    "nothing was changed, retry in a moment"
                ) from None
            error: ShipyardError = error_from_rpc(err)
            raise error from None

    async def image(self, token: str, group: str, ref: str) -> ResolvedImage:
        """The image version ``ref`` (``name`` means its latest) of ``group``."""
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(self._channel(self.imagebuild_addr))
        try:
            img = await self._call(
                "imagebuild",
                self.imagebuild_addr,
                stub.GetImage,
                imagebuild_pb2.GetImageRequest(group=group, image=ref),
                token,
            )
        except NotFound as exc:
            raise InvalidArgument(
                "image",
                str(exc),
                "build it with `shipyard image build` or pick one from `shipyard image list`",
            ) from None
        kind = img.kind or "pack"  # an imagebuild from before the field made packs only
        if kind not in IMAGE_KINDS:
            raise FailedPrecondition(
                f"image {img.name}:{img.version} is of kind {kind!r}, which this scheduler "
                "does not know (it runs kinds pack and oci); upgrade the scheduler"
            )
        if kind == "oci" and not img.image_ref:
            raise FailedPrecondition(
                f"image {img.name}:{img.version} (kind oci) has no image reference; build it again"
            )
        return ResolvedImage(
            name=img.name,
            version=img.version,
            digest=img.digest,
            pack_key=img.pack_url if kind == "pack" else "",
            workers=max(img.workers, 1),
            python=img.python,
            kind=cast(ImageKind, kind),
            image_ref=img.image_ref,
        )

    async def instance_type(self, token: str, name: str) -> InstanceTypeInfo:
        """The instance type ``name``; an unknown name lists the known ones."""
        stub = quota_pb2_grpc.QuotaServiceStub(self._channel(self.quota_addr))
        answer = await self._call(
            "quota",
            self.quota_addr,
            stub.ListInstanceTypes,
            quota_pb2.ListInstanceTypesRequest(),
            token,
        )
        for t in answer.instance_types:
            if t.name == name:
                return InstanceTypeInfo(t.name, t.cpu, t.memory_gib, t.gpu)
        known = ", ".join(t.name for t in answer.instance_types) or "none defined"
        raise InvalidArgument(
            "instance_type",
            f"{name!r} is not an instance type" if name else "is required",
            f"pick one of: {known} (`shipyard instance-types list`)",
        )

    async def reserve(
        self, token: str, group: str, deployment: str, instance_type: str, instances: int
    ) -> None:
        """Reserves (or resizes the reservation to) ``instances`` of ``instance_type``;
        a refusal is the quota's own message (what is needed, what is free)."""
        stub = quota_pb2_grpc.QuotaServiceStub(self._channel(self.quota_addr))
        await self._call(
            "quota",
            self.quota_addr,
            stub.Reserve,
            quota_pb2.ReserveRequest(
                group=group,
                reservation_id=reservation_id(deployment),
                deployment=deployment,
                instance_type=instance_type,
                instances=instances,
            ),
            token,
        )

    async def release(self, token: str, group: str, deployment: str) -> None:
        """Releases the deployment's reservation (a no-op when there is none)."""
        stub = quota_pb2_grpc.QuotaServiceStub(self._channel(self.quota_addr))
        await self._call(
            "quota",
            self.quota_addr,
            stub.Release,
            quota_pb2.ReleaseRequest(group=group, reservation_id=reservation_id(deployment)),
            token,
        )

    async def close(self) -> None:
        """Closes the channels."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
