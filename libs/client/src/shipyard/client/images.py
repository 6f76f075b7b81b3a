"""The imagebuild service: build an image from a model folder, follow its log, and the
image catalog (list, show, usage, readme, delete).

>>> build = client.images.build("./examples/iris", name="iris")
>>> build = client.images.wait(build.build_id, on_log=print)   # raises BuildFailed
>>> client.images.get(build.image).digest
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from gzip import GzipFile
from pathlib import Path
from typing import IO

import grpc

from shipyard.client._channel import Transport
from shipyard.client._convert import PlainData, enum_name, to_datetime
from shipyard.client.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ShipyardClientError,
    from_rpc_error,
)
from shipyard.imagebuild.v1 import imagebuild_pb2 as pb
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc as pb_grpc

SERVICE = "imagebuild"

# The upload: the folder as one gzipped tar, streamed in chunks of at most 1 MiB (the
# proto's contract). Folders are packed to a temporary file first (kept in memory while
# small), so a folder the client refuses never starts an upload.
CHUNK_SIZE = 1024 * 1024
_SPOOL_IN_MEMORY = 16 * 1024 * 1024
# Model files (pickles, ONNX, weights) compress little; a low level packs hundreds of MiB
# in seconds instead of tens of seconds, for a few percent more bytes on the wire.
_COMPRESS_LEVEL = 3
# An upload of a large model takes longer than an ordinary call's deadline.
UPLOAD_TIMEOUT = 600.0

# Never uploaded, at any depth: caches, VCS data and local virtualenvs.
EXCLUDED_NAMES = frozenset({"__pycache__", ".git", ".venv"})
EXCLUDED_SUFFIXES = (".pyc",)

BUILD_STATES = ("queued", "building", "succeeded", "failed")
FINAL_STATES = frozenset({"succeeded", "failed"})

# How much of a failed build's log tail goes into BuildFailed's one-line message.
_TAIL_LINES = 5
_TAIL_CHARS = 400


def _state(value: int) -> str:
    """``BUILD_STATE_QUEUED`` → ``"queued"`` (``"unspecified"`` for values this client
    does not know, e.g. from a newer server)."""
    return enum_name(pb.BuildState.Name, value, "BUILD_STATE_")


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)


@dataclass(frozen=True)
class Build(PlainData):
    """One build of a model folder. ``state`` is ``queued``, ``building``,
    ``succeeded`` or ``failed``; ``image`` (``name:version``) is set once it succeeded;
    a failed build keeps its ``reason`` and the tail of its log."""

    build_id: str
    group: str
    name: str
    state: str
    version: int = 0
    cache_hit: bool = False
    reason: str = ""
    log_tail: str = ""
    requested_by: str = ""
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    source_digest: str = ""
    image: str = ""

    @classmethod
    def from_proto(cls, msg: pb.Build) -> Build:
        """Builds it from the protobuf message."""
        return cls(
            build_id=msg.build_id,
            group=msg.group,
            name=msg.name,
            state=_state(msg.state),
            version=msg.version,
            cache_hit=msg.cache_hit,
            reason=msg.reason,
            log_tail=msg.log_tail,
            requested_by=msg.requested_by,
            queued_at=to_datetime(msg.queued_at),
            started_at=to_datetime(msg.started_at),
            finished_at=to_datetime(msg.finished_at),
            attempts=msg.attempts,
            source_digest=msg.source_digest,
            image=msg.image,
        )

    @property
    def done(self) -> bool:
        """Whether the build has ended (succeeded or failed)."""
        return self.state in FINAL_STATES

    @property
    def succeeded(self) -> bool:
        """Whether the build made (or found in the cache) its image."""
        return self.state == "succeeded"

    @property
    def failed(self) -> bool:
        """Whether the build failed (see ``reason`` and ``log_tail``)."""
        return self.state == "failed"

    @property
    def seconds(self) -> float | None:
        """How long the build ran (start to finish; queued to finish when it never
        recorded a start); ``None`` while it runs."""
        return _seconds(self.started_at or self.queued_at, self.finished_at)


@dataclass(frozen=True)
class LogLine(PlainData):
    """One line of a build's log; ``seq`` numbers the lines of a build from 1."""

    seq: int
    line: str
    at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: pb.BuildLogLine) -> LogLine:
        """Builds it from the protobuf message (without the trailing newline)."""
        return cls(seq=msg.seq, line=msg.line.rstrip("\r\n"), at=to_datetime(msg.at))


@dataclass(frozen=True)
class Package(PlainData):
    """A Python distribution installed in an image."""

    name: str
    version: str

    @classmethod
    def from_proto(cls, msg: pb.Package) -> Package:
        """Builds it from the protobuf message."""
        return cls(name=msg.name, version=msg.version)


@dataclass(frozen=True)
class Image(PlainData):
    """One image version (``name:version``): an environment pack in the object store
    (``kind`` ``pack``, at ``pack_url``) or, built on a cluster, an OCI image in a registry
    (``kind`` ``oci``, at ``image_ref``, pinned by digest)."""

    group: str
    name: str
    version: int
    digest: str = ""
    size_bytes: int = 0
    python: str = ""
    packages: list[Package] = field(default_factory=list)
    created_by: str = ""
    created_at: datetime | None = None
    source: str = ""
    build_id: str = ""
    script: str = ""
    workers: int = 0
    pack_url: str = ""
    """The pack's object store key (empty for an OCI image)."""
    kind: str = "pack"
    """``pack`` or ``oci``."""
    image_ref: str = ""
    """The OCI image, ``registry/repository@sha256:<digest>`` (empty for a pack)."""

    @classmethod
    def from_proto(cls, msg: pb.Image) -> Image:
        """Builds it from the protobuf message."""
        return cls(
            group=msg.group,
            name=msg.name,
            version=msg.version,
            digest=msg.digest,
            size_bytes=msg.size_bytes,
            python=msg.python,
            packages=[Package.from_proto(p) for p in msg.packages],
            created_by=msg.created_by,
            created_at=to_datetime(msg.created_at),
            source=msg.source,
            build_id=msg.build_id,
            script=msg.script,
            workers=msg.workers,
            pack_url=msg.pack_url,
            # Servers from before the field made packs only.
            kind=msg.kind or "pack",
            image_ref=msg.image_ref,
        )

    @property
    def ref(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class ImageUsage(PlainData):
    """The deployments that use an image version (a delete is refused while any do)."""

    image: str
    deployments: list[str] = field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: pb.ImageUsage) -> ImageUsage:
        """Builds it from the protobuf message."""
        return cls(image=msg.image, deployments=list(msg.deployments))


@dataclass(frozen=True)
class Readme(PlainData):
    """An image's readme (GitHub-flavoured Markdown)."""

    image: str
    markdown: str = ""
    updated_at: datetime | None = None
    updated_by: str = ""

    @classmethod
    def from_proto(cls, msg: pb.Readme) -> Readme:
        """Builds it from the protobuf message."""
        return cls(
            image=msg.image,
            markdown=msg.markdown,
            updated_at=to_datetime(msg.updated_at),
            updated_by=msg.updated_by,
        )


class ModelFolderError(InvalidArgument):
    """The model folder cannot be uploaded as it is (missing, not a directory, a symlink
    leading outside it, a file that cannot be read, ...); the message names the path."""


class BuildFailed(ShipyardClientError):
    """A build ended in ``failed``. ``build`` is the final record; the message carries
    the reason and the tail of the build's log, on one line."""

    default_code = "BUILD_FAILED"

    def __init__(self, build: Build) -> None:
        self.build = build
        self.reason = build.reason or "no reason recorded"
        message = f"build {build.build_id} failed: {self.reason}"
        tail = _tail(build.log_tail, skip=build.reason)
        if tail:
            message = f"{message} (log tail: {tail})"
        super().__init__(message, service=SERVICE)


def _tail(log_tail: str, *, skip: str = "") -> str:
    """The last few non-empty lines of a log tail as ``a | b | c``, at most a few hundred
    characters; a line equal to ``skip`` (the reason, already said) is left out."""
    lines = [line.strip() for line in log_tail.splitlines()]
    lines = [line for line in lines if line and line != skip.strip()][-_TAIL_LINES:]
    text = " | ".join(lines)
    if len(text) > _TAIL_CHARS:
        text = "…" + text[-(_TAIL_CHARS - 1) :]
    return text


@dataclass(frozen=True)
class PackedFolder:
    """A model folder packed for upload: the files it holds (POSIX paths relative to the
    folder), their total size, and the gzipped tar (positioned at its start)."""

    files: list[str]
    total_bytes: int
    archive: IO[bytes]
    archive_bytes: int


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives (Windows)
        return False


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


class _Packer:
    """Walks a model folder and writes its directories and regular files into a tar.

    Entries are written in sorted order with fixed owners and timestamps, so the same
    folder content always gives the same bytes. A symlink is stored as what it points to
    (it must stay inside the folder); anything but directories and regular files is
    refused.
    """

    def __init__(self, folder: Path, tar: tarfile.TarFile) -> None:
        self.folder = folder
        self.root = os.path.realpath(folder)
        self.tar = tar
        self.files: list[str] = []
        self.total_bytes = 0

    def _error(self, rel: str, problem: str) -> ModelFolderError:
        return ModelFolderError(
            f"{os.path.join(self.folder, rel)} {problem}", service=SERVICE, method="StartBuild"
        )

    def pack(self) -> None:
        self._walk(self.root, "", {self.root})

    def _walk(self, directory: str, rel: str, ancestors: set[str]) -> None:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise self._error(rel or ".", f"cannot be read: {exc.strerror or exc}") from None
        for entry in entries:
            name = entry.name
            if name in EXCLUDED_NAMES or name.endswith(EXCLUDED_SUFFIXES):
                continue
            child = f"{rel}/{name}" if rel else name
            path = entry.path
            if entry.is_symlink():
                path = self._follow(entry, child)
            try:
                st = os.stat(path)
            except OSError as exc:
                raise self._error(child, f"cannot be read: {exc.strerror or exc}") from None
            if stat.S_ISDIR(st.st_mode):
                real = os.path.realpath(path)
                if real in ancestors:
                    raise self._error(
                        child, "is a symlink to a folder that contains it (a loop); remove it"
                    )
                self._add_dir(child)
                self._walk(real, child, ancestors | {real})
            elif stat.S_ISREG(st.st_mode):
                self._add_file(child, path, st)
            else:
                raise self._error(
                    child, f"is {_kind(st.st_mode)}; only folders and regular files are uploaded"
                )

    def _follow(self, entry: os.DirEntry[str], rel: str) -> str:
        """The real path a symlink leads to, refused unless it exists inside the folder."""
        target = os.path.realpath(entry.path)
        if not _inside(target, self.root):
            raise self._error(
                rel,
                f"is a symlink to {target}, outside the model folder; "
                "copy what it points to into the folder instead",
            )
        if not os.path.exists(target):
            raise self._error(rel, f"is a broken symlink (to {os.readlink(entry.path)})")
        return target

    def _info(self, rel: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(rel)
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def _add_dir(self, rel: str) -> None:
        info = self._info(rel)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        self.tar.addfile(info)

    def _add_file(self, rel: str, path: str, st: os.stat_result) -> None:
        info = self._info(rel)
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
        try:
            with open(path, "rb") as fh:
                self.tar.addfile(info, fh)
        except OSError as exc:
            # Unreadable, or changed size while being packed.
            raise self._error(rel, f"cannot be read: {exc.strerror or exc}") from None
        self.files.append(rel)
        self.total_bytes += st.st_size


def check_folder(folder: str | os.PathLike[str]) -> Path:
    """The folder as a path; :class:`ModelFolderError` unless it is an existing directory."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise ModelFolderError(
            f"model folder {path} does not exist", service=SERVICE, method="StartBuild"
        )
    if not path.is_dir():
        raise ModelFolderError(
            f"{path} is not a folder: pass the folder that holds the model files and serve.py",
            service=SERVICE,
            method="StartBuild",
        )
    return path


def pack_folder(folder: str | os.PathLike[str]) -> PackedFolder:
    """Packs a model folder as a gzipped tar for upload, the way :meth:`ImagesClient.build`
    does: directories and regular files only; ``__pycache__``, ``.git``, ``.venv`` and
    ``*.pyc`` left out; symlinks stored as their targets, refused when those lie outside
    the folder. The same content always gives the same bytes. Raises
    :class:`ModelFolderError`. Close ``archive`` when done."""
    path = check_folder(folder)
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
    try:
        with (
            GzipFile(
                filename="", mode="wb", fileobj=spool, mtime=0, compresslevel=_COMPRESS_LEVEL
            ) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            packer = _Packer(path, tar)
            packer.pack()
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return PackedFolder(
        files=packer.files,
        total_bytes=packer.total_bytes,
        archive=spool,
        archive_bytes=size,
    )


def _upload(header: pb.StartBuildHeader, archive: IO[bytes]) -> Iterator[pb.StartBuildRequest]:
    yield pb.StartBuildRequest(header=header)
    while chunk := archive.read(CHUNK_SIZE):
        yield pb.StartBuildRequest(chunk=chunk)


def split_image(image: str) -> tuple[str, int | None]:
    """``"iris:3"`` → ``("iris", 3)``; ``"iris"`` → ``("iris", None)`` (the latest).
    Raises :class:`InvalidArgument` for anything else."""
    name, sep, version = image.partition(":")
    if not name or (sep and not version.isdigit()):
        raise InvalidArgument(
            f"image {image!r}: expected NAME or NAME:VERSION (e.g. iris or iris:3)",
            service=SERVICE,
        )
    return name, int(version) if sep else None


class ImagesClient:
    """Typed calls to the imagebuild service. Obtain it as ``Client().images``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _stub(self) -> pb_grpc.ImageBuildServiceStub:
        return self._transport.stub(SERVICE, pb_grpc.ImageBuildServiceStub)

    def _error(self, err: grpc.RpcError, method: str, timeout: float | None) -> ShipyardClientError:
        return from_rpc_error(
            err,
            service=SERVICE,
            address=self._transport.address(SERVICE),
            method=method,
            has_token=self._transport.has_token,
            timeout=timeout,
        )

    # Builds.

    def build(
        self,
        folder: str | os.PathLike[str],
        *,
        name: str,
        group: str | None = None,
        python: str | None = None,
        skip_dependency_install: bool = False,
        source_name: str | None = None,
        timeout: float = UPLOAD_TIMEOUT,
    ) -> Build:
        """Uploads a model folder and queues its build; returns at once with the queued
        build, or the finished one when identical inputs were built before
        (``cache_hit``). Follow it with :meth:`wait`.

        ``group`` defaults to the caller's only group; ``python`` (``"3.11"``) overrides
        the folder's ``shipyard.yaml``; ``skip_dependency_install`` records the
        requirements without installing or checking them (offline sites);
        ``source_name`` is recorded as where the folder came from (default: ``folder``
        as given). ``timeout`` bounds the upload. Raises :class:`ModelFolderError` before
        any upload when the folder cannot be packed (see :func:`pack_folder`).
        """
        if not name:
            raise InvalidArgument("name: an image needs a name (e.g. iris)", service=SERVICE)
        packed = pack_folder(folder)
        header = pb.StartBuildHeader(
            group=group or "",
            name=name,
            options=pb.BuildOptions(
                python=python or "", skip_dependency_install=skip_dependency_install
            ),
            source_name=source_name if source_name is not None else os.fspath(folder),
        )
        with packed.archive:
            reply: pb.Build = self._transport.call(
                SERVICE,
                "StartBuild",
                self._stub().StartBuild,
                _upload(header, packed.archive),
                timeout=timeout,
            )
        return Build.from_proto(reply)

    def get_build(self, build_id: str) -> Build:
        """One build, as it stands now."""
        reply: pb.Build = self._transport.call(
            SERVICE, "GetBuild", self._stub().GetBuild, pb.GetBuildRequest(build_id=build_id)
        )
        return Build.from_proto(reply)

    def list_builds(
        self, group: str | None = None, name: str | None = None, limit: int = 50
    ) -> list[Build]:
        """Recent builds, newest first, of one group and/or image name (default: every
        group the caller sees, every name)."""
        reply: pb.ListBuildsResponse = self._transport.call(
            SERVICE,
            "ListBuilds",
            self._stub().ListBuilds,
            pb.ListBuildsRequest(group=group or "", name=name or "", limit=limit),
        )
        return [Build.from_proto(b) for b in reply.builds]

    def log_lines(
        self, build_id: str, follow: bool = False, *, timeout: float | None = None
    ) -> Iterator[LogLine]:
        """A build's log from its first line, with sequence numbers and timestamps. With
        ``follow`` it goes on live until the build ends. ``timeout`` bounds the whole
        stream (default: the client's timeout without ``follow``, none with it)."""
        deadline = timeout if timeout is not None or follow else self._transport.timeout
        request = pb.StreamBuildLogsRequest(build_id=build_id, follow=follow)
        call = self._stub().StreamBuildLogs(
            request, metadata=self._transport.metadata(), timeout=deadline
        )
        try:
            for msg in call:
                yield LogLine.from_proto(msg)
        except grpc.RpcError as err:
            raise self._error(err, "StreamBuildLogs", deadline) from None
        finally:
            call.cancel()  # a no-op once the stream ended; stops it when the reader quits

    def logs(self, build_id: str, follow: bool = False) -> Iterator[str]:
        """A build's log lines (without newlines); with ``follow``, live until it ends."""
        for line in self.log_lines(build_id, follow):
            yield line.line

    def wait(
        self,
        build_id: str,
        *,
        timeout: float | None = None,
        on_log: Callable[[str], None] | None = None,
    ) -> Build:
        """Follows a build until it ends, calling ``on_log(line)`` for each log line in
        order (each once), and returns the final build.

        Raises :class:`BuildFailed` when the build failed, and :class:`DeadlineExceeded`
        when it has not ended within ``timeout`` seconds (default: no limit; the build
        goes on either way).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_seq = 0
        pause = 0.05
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise self._still_running(build_id, timeout)
            try:
                for line in self.log_lines(build_id, follow=True, timeout=remaining):
                    # A stream opened again repeats the log from the start.
                    if line.seq and line.seq <= last_seq:
                        continue
                    last_seq = line.seq or last_seq
                    if on_log is not None:
                        on_log(line.line)
            except DeadlineExceeded:
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._still_running(build_id, timeout) from None
                raise
            build = self.get_build(build_id)
            if build.failed:
                raise BuildFailed(build)
            if build.done:
                return build
            # The log ended but the build's record says it runs: the read model lags
            # behind the log, or the stream was cut. Look again shortly.
            if deadline is not None:
                pause = min(pause, max(deadline - time.monotonic(), 0.0))
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _still_running(self, build_id: str, timeout: float | None) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"build {build_id} did not end within {timeout or 0:g}s",
            service=SERVICE,
            method="StreamBuildLogs",
            hint=f"it goes on: `shipyard image logs {build_id} --follow`",
        )

    # The catalog.

    def list_images(self, group: str | None = None, name: str | None = None) -> list[Image]:
        """Images of one group and/or every version of one name (default: every group
        the caller sees, every name)."""
        reply: pb.ListImagesResponse = self._transport.call(
            SERVICE,
            "ListImages",
            self._stub().ListImages,
            pb.ListImagesRequest(group=group or "", name=name or ""),
        )
        return [Image.from_proto(i) for i in reply.images]

    def get(self, image: str, group: str | None = None) -> Image:
        """One image: ``name:version``, or ``name`` for its latest version."""
        split_image(image)
        reply: pb.Image = self._transport.call(
            SERVICE,
            "GetImage",
            self._stub().GetImage,
            pb.GetImageRequest(group=group or "", image=image),
        )
        return Image.from_proto(reply)

    def usage(self, image: str, group: str | None = None) -> ImageUsage:
        """The deployments that use an image version."""
        split_image(image)
        reply: pb.ImageUsage = self._transport.call(
            SERVICE,
            "GetImageUsage",
            self._stub().GetImageUsage,
            pb.GetImageUsageRequest(group=group or "", image=image),
        )
        return ImageUsage.from_proto(reply)

    def get_readme(self, image: str, group: str | None = None) -> Readme:
        """An image's readme with who changed it last and when."""
        split_image(image)
        reply: pb.Readme = self._transport.call(
            SERVICE,
            "GetReadme",
            self._stub().GetReadme,
            pb.GetReadmeRequest(group=group or "", image=image),
        )
        return Readme.from_proto(reply)

    def readme(self, image: str, group: str | None = None) -> str:
        """An image's readme (Markdown; empty when it has none)."""
        return self.get_readme(image, group).markdown

    def set_readme(self, image: str, markdown: str, group: str | None = None) -> Readme:
        """Replaces an image's readme (GitHub-flavoured Markdown, at most 256 KiB)."""
        split_image(image)
        reply: pb.Readme = self._transport.call(
            SERVICE,
            "SetReadme",
            self._stub().SetReadme,
            pb.SetReadmeRequest(group=group or "", image=image, markdown=markdown),
        )
        return Readme.from_proto(reply)

    def delete(self, image: str, group: str | None = None) -> None:
        """Deletes one image version (``name:version``: never "the latest" implicitly).
        Refused (:class:`~shipyard.client.errors.FailedPrecondition`) while a deployment
        uses it."""
        _, version = split_image(image)
        if version is None:
            raise InvalidArgument(
                f"image {image!r}: delete needs NAME:VERSION (e.g. {image}:1)", service=SERVICE
            )
        self._transport.call(
            SERVICE,
            "DeleteImage",
            self._stub().DeleteImage,
            pb.DeleteImageRequest(group=group or "", image=image),
        )
