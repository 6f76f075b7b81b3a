"""ImageBuildService over gRPC: protobuf ↔ the app layer. No logic here."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from shipyard.imagebuild.v1 import imagebuild_pb2 as pb
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc
from shipyard_core.auth import current_principal
from shipyard_core.errors import InvalidArgument
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_imagebuild.app import buildlogs
from shipyard_imagebuild.app.commands import BuildOptions, ImageCommands
from shipyard_imagebuild.app.queries import ImageQueries
from shipyard_imagebuild.app.views import BuildView, ImageView

_STATES = {
    "queued": pb.BUILD_STATE_QUEUED,
    "building": pb.BUILD_STATE_BUILDING,
    "succeeded": pb.BUILD_STATE_SUCCEEDED,
    "failed": pb.BUILD_STATE_FAILED,
}


class ImageBuildApi(imagebuild_pb2_grpc.ImageBuildServiceServicer):
    """The gRPC face of imagebuild."""

    def __init__(
        self, commands: ImageCommands, queries: ImageQueries, max_upload_bytes: int
    ) -> None:
        self.commands = commands
        self.queries = queries
        self.max_upload_bytes = max_upload_bytes

    async def StartBuild(
        self, request_iterator: AsyncIterator[pb.StartBuildRequest], context: Any
    ) -> pb.Build:
        caller = current_principal()
        header: pb.StartBuildHeader | None = None
        with tempfile.TemporaryDirectory(prefix="shipyard-upload-") as tmp:
            upload = Path(tmp) / "source.tar.gz"
            size = 0
            with upload.open("wb") as fh:
                async for part in request_iterator:
                    if part.HasField("header"):
                        if header is not None:
                            raise InvalidArgument("header", "was sent twice", "send it first, once")
                        header = part.header
                        continue
                    if header is None:
                        raise InvalidArgument("header", "must come first", "send it before data")
                    size += len(part.chunk)
                    if size > self.max_upload_bytes:
                        raise InvalidArgument(
                            "source",
                            f"the upload is over {self.max_upload_bytes >> 20} MiB",
                            "leave data sets and caches out of the model folder",
                        )
                    fh.write(part.chunk)
            if header is None:
                raise InvalidArgument("header", "is missing", "send a header with the image name")
            if size == 0:
                raise InvalidArgument("source", "is empty", "send the model folder as a tar.gz")
            view = await self.commands.start_build(
                caller,
                header.group,
                header.name,
                BuildOptions(
                    python=header.options.python,
                    skip_dependency_install=header.options.skip_dependency_install,
                ),
                upload,
                header.source_name,
            )
        return build_message(view)

    async def GetBuild(self, request: pb.GetBuildRequest, context: Any) -> pb.Build:
        return build_message(await self.queries.build(current_principal(), request.build_id))

    async def ListBuilds(
        self, request: pb.ListBuildsRequest, context: Any
    ) -> pb.ListBuildsResponse:
        views = await self.queries.builds(
            current_principal(), request.group, request.name, request.limit or 50
        )
        return pb.ListBuildsResponse(builds=[build_message(v) for v in views])

    async def StreamBuildLogs(
        self, request: pb.StreamBuildLogsRequest, context: Any
    ) -> AsyncIterator[pb.BuildLogLine]:
        caller = current_principal()
        await self.queries.build(caller, request.build_id)  # existence and permission

        async def finished() -> bool:
            if not request.follow:
                return True
            view = await self.queries.build(caller, request.build_id)
            return view.state in ("succeeded", "failed")

        async for row in buildlogs.follow(self.queries.pool, request.build_id, finished):
            yield pb.BuildLogLine(seq=row["seq"], at=to_timestamp(row["at"]), line=row["line"])

    async def ListImages(
        self, request: pb.ListImagesRequest, context: Any
    ) -> pb.ListImagesResponse:
        views = await self.queries.images(current_principal(), request.group, request.name)
        return pb.ListImagesResponse(images=[image_message(v) for v in views])

    async def GetImage(self, request: pb.GetImageRequest, context: Any) -> pb.Image:
        view = await self.queries.image(current_principal(), request.group, request.image)
        return image_message(view)

    async def GetImageUsage(self, request: pb.GetImageUsageRequest, context: Any) -> pb.ImageUsage:
        view = await self.queries.image(current_principal(), request.group, request.image)
        users = await self.queries.deployments_using(view.group, view.name, view.version)
        return pb.ImageUsage(image=view.ref, deployments=users)

    async def GetReadme(self, request: pb.GetReadmeRequest, context: Any) -> pb.Readme:
        view = await self.queries.image(current_principal(), request.group, request.image)
        return readme_message(view)

    async def SetReadme(self, request: pb.SetReadmeRequest, context: Any) -> pb.Readme:
        view = await self.commands.set_readme(
            current_principal(), request.group, request.image, request.markdown
        )
        return readme_message(view)

    async def DeleteImage(
        self, request: pb.DeleteImageRequest, context: Any
    ) -> pb.DeleteImageResponse:
        await self.commands.delete(current_principal(), request.group, request.image)
        return pb.DeleteImageResponse()


def build_message(v: BuildView) -> pb.Build:
    """A build as protobuf."""
    return pb.Build(
        build_id=v.build_id,
        group=v.group,
        name=v.name,
        state=_STATES.get(v.state, pb.BUILD_STATE_UNSPECIFIED),
        version=v.version,
        cache_hit=v.cache_hit,
        reason=v.reason,
        log_tail=v.log_tail,
        requested_by=v.requested_by,
        queued_at=to_timestamp(v.queued_at),
        started_at=to_timestamp(v.started_at),
        finished_at=to_timestamp(v.finished_at),
        attempts=v.attempts,
        source_digest=v.source_digest,
        image=v.image,
    )


def image_message(v: ImageView) -> pb.Image:
    """An image version as protobuf."""
    return pb.Image(
        group=v.group,
        name=v.name,
        version=v.version,
        digest=v.digest,
        size_bytes=v.size_bytes,
        python=v.python,
        packages=[pb.Package(name=n, version=ver) for n, ver in v.packages],
        created_by=v.created_by,
        created_at=to_timestamp(v.created_at),
        source=v.source,
        build_id=v.build_id,
        script=v.script,
        workers=v.workers,
        pack_url=v.pack_key,
        kind=v.kind,
        image_ref=v.image_ref,
    )


def readme_message(v: ImageView) -> pb.Readme:
    """A version's readme as protobuf."""
    return pb.Readme(
        image=v.ref,
        markdown=v.readme,
        updated_at=to_timestamp(v.readme_updated_at),
        updated_by=v.readme_updated_by,
    )
