"""``client.images`` and ``shipyard image`` against a fake ImageBuildService: the folder
upload (packing, exclusions, symlinks, chunking), log following, build failures, and the
CLI's output. The real service is tested end to end elsewhere."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from shipyard.client import (
    Build,
    BuildFailed,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    Image,
    InvalidArgument,
    ModelFolderError,
    NotFound,
)
from shipyard.client.images import CHUNK_SIZE, pack_folder, split_image
from shipyard.imagebuild.v1 import imagebuild_pb2 as pb
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc as pb_grpc

from .conftest import (
    assert_json_output,
    assert_one_line_error,
    assert_text_output,
    run,
    serving,
    shipyard,
    write_config,
)

TOKEN = "sy_admin_secret"
QUEUED = Timestamp(seconds=1_700_000_000)
STARTED = Timestamp(seconds=1_700_000_001)
FINISHED = Timestamp(seconds=1_700_000_013, nanos=300_000_000)
DIGEST = "sha256:" + "ab12" * 16
FAILURE = "predict() raised ValueError: expected 4 features, got 3"

GOOD_LOG = ["resolving requirements", "installing scikit-learn==1.5.2", "load() ok", "predict() ok"]
BAD_LOG = ["resolving requirements", "calling predict() on the example input", FAILURE]


@dataclass
class Upload:
    """What StartBuild received: the header, the chunk sizes and the extracted files."""

    header: pb.StartBuildHeader
    chunk_sizes: list[int]
    files: dict[str, bytes]
    member_types: set[bytes]


@dataclass
class Plan:
    """How a fake build goes: its log, and how it ends."""

    lines: list[str]
    final: Any  # a pb.BuildState value
    reason: str = ""
    stale_reads: int = 0  # GetBuild answers "building" this many times after the log ended
    hang: bool = False  # the log never ends


def _image(name: str, version: int, group: str = "team-a") -> pb.Image:
    return pb.Image(
        group=group,
        name=name,
        version=version,
        digest=DIGEST,
        size_bytes=145 * 1024 * 1024,
        python="3.11",
        packages=[
            pb.Package(name="scikit-learn", version="1.5.2"),
            pb.Package(name="shipyard-runtime", version="0.1.0"),
        ],
        created_by="ana",
        created_at=FINISHED,
        source=f"./examples/{name} (sha256:feed)",
        build_id=f"b-{name}-{version}",
        script="serve.py",
        workers=2,
        pack_url=f"file:///packs/{name}-{version}.tar.zst",
        kind="pack",
    )


OCI_REF = "registry.example/shipyard/team-a/iris-k8s@" + DIGEST


def _oci_image(name: str, version: int) -> pb.Image:
    """A cluster-built image as imagebuild answers it: no pack, a reference, size 0."""
    image = _image(name, version)
    image.pack_url = ""
    image.kind = "oci"
    image.image_ref = OCI_REF
    image.size_bytes = 0
    return image


@dataclass
class FakeImageBuild(pb_grpc.ImageBuildServiceServicer):
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    builds: dict[str, pb.Build] = field(default_factory=dict)
    plans: dict[str, Plan] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    images: dict[str, pb.Image] = field(default_factory=dict)
    readmes: dict[str, pb.Readme] = field(default_factory=dict)
    usage: dict[str, list[str]] = field(default_factory=dict)

    def reset(self) -> None:
        self.seen.clear()
        self.builds.clear()
        self.plans.clear()
        self.uploads.clear()
        self.images = {
            "iris:1": _image("iris", 1),
            "iris:2": _image("iris", 2),
            "iris-k8s:1": _oci_image("iris-k8s", 1),
        }
        self.readmes = {"iris:2": pb.Readme(image="iris:2", markdown="# Iris\n\nFlowers.\n")}
        self.usage = {"iris:2": ["iris-prod", "iris-canary"]}

    def methods(self) -> list[str]:
        return [name for name, _ in self.seen]

    async def _record(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() or ()}
        self.seen.append((method, metadata))
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")

    async def StartBuild(self, request_iterator: Any, context: Any) -> pb.Build:
        await self._record("StartBuild", context)
        header: pb.StartBuildHeader | None = None
        data = bytearray()
        sizes: list[int] = []
        async for msg in request_iterator:
            if msg.WhichOneof("part") == "header":
                assert header is None and not sizes, "one header, first"
                header = msg.header
            else:
                assert header is not None, "the header comes first"
                sizes.append(len(msg.chunk))
                data.extend(msg.chunk)
        assert header is not None
        files, types = _extract(bytes(data))
        if "serve.py" not in files:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "serve.py is missing: add it with load(model_dir) and predict(model, payload)",
            )
        build_id = f"b-{len(self.uploads) + 1:04d}"
        self.uploads[build_id] = Upload(header, sizes, files, types)
        name = header.name
        version = sum(1 for i in self.images.values() if i.name == name) + 1
        build = pb.Build(
            build_id=build_id,
            group=header.group or "team-a",
            name=name,
            state=pb.BUILD_STATE_QUEUED,
            requested_by="admin",
            queued_at=QUEUED,
            attempts=1,
            source_digest="sha256:feed",
        )
        if name == "cached":
            build.state = pb.BUILD_STATE_SUCCEEDED
            build.cache_hit = True
            build.version = 1
            build.image = "cached:1"
            build.finished_at.CopyFrom(QUEUED)
            self.images["cached:1"] = _image("cached", 1, build.group)
        elif name == "broken":
            self.plans[build_id] = Plan(BAD_LOG, pb.BUILD_STATE_FAILED, reason=FAILURE)
        else:
            self.plans[build_id] = Plan(
                GOOD_LOG,
                pb.BUILD_STATE_SUCCEEDED,
                stale_reads=2 if name == "laggy" else 0,
                hang=name == "slow",
            )
            build.version = version
        self.builds[build_id] = build
        return build

    def _finish(self, build_id: str) -> None:
        build, plan = self.builds[build_id], self.plans[build_id]
        if build.state == plan.final:
            return
        build.state = plan.final
        build.started_at.CopyFrom(STARTED)
        build.finished_at.CopyFrom(FINISHED)
        if plan.final == pb.BUILD_STATE_FAILED:
            build.reason = plan.reason
            build.log_tail = "\n".join(plan.lines[-3:])
        else:
            build.image = f"{build.name}:{build.version}"
            self.images[build.image] = _image(build.name, build.version, build.group)

    async def GetBuild(self, request: Any, context: Any) -> pb.Build:
        await self._record("GetBuild", context)
        if request.build_id not in self.builds:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"build {request.build_id} not found")
        plan = self.plans.get(request.build_id)
        if plan is not None and plan.stale_reads > 0:
            plan.stale_reads -= 1
            stale = pb.Build()
            stale.CopyFrom(self.builds[request.build_id])
            stale.state = pb.BUILD_STATE_BUILDING
            return stale
        return self.builds[request.build_id]

    async def ListBuilds(self, request: Any, context: Any) -> pb.ListBuildsResponse:
        await self._record("ListBuilds", context)
        builds = [
            b
            for b in reversed(self.builds.values())
            if (not request.name or b.name == request.name)
            and (not request.group or b.group == request.group)
        ]
        return pb.ListBuildsResponse(builds=builds[: request.limit or 50])

    async def StreamBuildLogs(self, request: Any, context: Any) -> AsyncIterator[pb.BuildLogLine]:
        await self._record("StreamBuildLogs", context)
        if request.build_id not in self.builds:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"build {request.build_id} not found")
        plan = self.plans.get(request.build_id)
        if plan is None:
            return
        for seq, line in enumerate(plan.lines, start=1):
            yield pb.BuildLogLine(seq=seq, at=STARTED, line=line + "\n")
            await asyncio.sleep(0)
        if request.follow:
            if plan.hang:
                await asyncio.sleep(3600)
            self._finish(request.build_id)

    async def ListImages(self, request: Any, context: Any) -> pb.ListImagesResponse:
        await self._record("ListImages", context)
        images = [
            i
            for i in self.images.values()
            if (not request.name or i.name == request.name)
            and (not request.group or i.group == request.group)
        ]
        return pb.ListImagesResponse(images=images)

    async def _find(self, image: str, context: Any) -> pb.Image:
        if ":" not in image:
            versions = [i for i in self.images.values() if i.name == image]
            if versions:
                return max(versions, key=lambda i: i.version)
        elif image in self.images:
            return self.images[image]
        await context.abort(grpc.StatusCode.NOT_FOUND, f"image {image} not found")
        raise AssertionError("unreachable")

    async def GetImage(self, request: Any, context: Any) -> pb.Image:
        await self._record("GetImage", context)
        return await self._find(request.image, context)

    async def GetImageUsage(self, request: Any, context: Any) -> pb.ImageUsage:
        await self._record("GetImageUsage", context)
        found = await self._find(request.image, context)
        ref = f"{found.name}:{found.version}"
        return pb.ImageUsage(image=ref, deployments=self.usage.get(ref, []))

    async def GetReadme(self, request: Any, context: Any) -> pb.Readme:
        await self._record("GetReadme", context)
        found = await self._find(request.image, context)
        ref = f"{found.name}:{found.version}"
        return self.readmes.get(ref, pb.Readme(image=ref))

    async def SetReadme(self, request: Any, context: Any) -> pb.Readme:
        await self._record("SetReadme", context)
        found = await self._find(request.image, context)
        ref = f"{found.name}:{found.version}"
        self.readmes[ref] = pb.Readme(
            image=ref, markdown=request.markdown, updated_at=FINISHED, updated_by="admin"
        )
        return self.readmes[ref]

    async def DeleteImage(self, request: Any, context: Any) -> pb.DeleteImageResponse:
        await self._record("DeleteImage", context)
        found = await self._find(request.image, context)
        ref = f"{found.name}:{found.version}"
        if self.usage.get(ref):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{ref} is used by {', '.join(self.usage[ref])}: delete or update them first",
            )
        del self.images[ref]
        return pb.DeleteImageResponse()


def _extract(data: bytes) -> tuple[dict[str, bytes], set[bytes]]:
    """Extracts the upload like a server would (the ``data`` filter refuses anything that
    would land outside the target) and reads the files back."""
    types: set[bytes] = set()
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as target:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            types = {m.type for m in tar.getmembers()}
            tar.extractall(target, filter="data")
        for path in Path(target).rglob("*"):
            if path.is_file():
                files[path.relative_to(target).as_posix()] = path.read_bytes()
    return files, types


@dataclass
class Fake:
    servicer: FakeImageBuild
    address: str
    home: Path


@pytest.fixture(scope="module")
async def image_server() -> AsyncIterator[tuple[FakeImageBuild, str]]:
    servicer = FakeImageBuild()
    async with serving((pb_grpc.add_ImageBuildServiceServicer_to_server, servicer)) as address:
        yield servicer, address


@pytest.fixture
def fake(image_server: tuple[FakeImageBuild, str], tmp_path: Path) -> Fake:
    """The fake service, reset, and a Shipyard home pointing the imagebuild service at it."""
    servicer, address = image_server
    servicer.reset()
    home = write_config(tmp_path / "home", TOKEN, {"imagebuild": address})
    return Fake(servicer, address, home)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A model folder with what must go up and what must not."""
    folder = tmp_path / "iris"
    (folder / "data" / "nested").mkdir(parents=True)
    (folder / "serve.py").write_text(
        "def load(d):\n    return 1\n\ndef predict(m, p):\n    return p\n"
    )
    (folder / "requirements.txt").write_text("scikit-learn==1.5.2\n")
    (folder / "model.joblib").write_bytes(os.urandom(2 * CHUNK_SIZE + 12345))  # > 2 chunks
    (folder / "data" / "nested" / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    (folder / "data" / "empty").mkdir()
    (folder / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (folder / "run.sh").chmod(0o755)
    # Inside symlinks travel as the files they point to.
    (folder / "labels.txt").symlink_to(Path("data") / "nested" / "labels.txt")
    (folder / "more").symlink_to("data/nested", target_is_directory=True)
    # Never uploaded.
    for junk in ("__pycache__/serve.cpython-311.pyc", ".git/HEAD", ".venv/bin/python"):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_text("junk")
    (folder / "old.pyc").write_bytes(b"\x00junk")
    (folder / "data" / "__pycache__").mkdir()
    (folder / "data" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    return folder


EXPECTED_FILES = {
    "serve.py",
    "requirements.txt",
    "model.joblib",
    "run.sh",
    "labels.txt",
    "data/nested/labels.txt",
    "more/labels.txt",
}


# The upload.


async def test_the_folder_arrives_intact_in_chunks(fake: Fake, model: Path) -> None:
    client = Client(home=fake.home)
    build = await run(
        client.images.build,
        model,
        name="iris",
        group="team-a",
        python="3.11",
        skip_dependency_install=True,
        source_name="./examples/iris",
    )
    assert isinstance(build, Build)
    assert build.state == "queued"
    assert build.done is False
    upload = fake.servicer.uploads[build.build_id]
    assert upload.header.name == "iris"
    assert upload.header.group == "team-a"
    assert upload.header.source_name == "./examples/iris"
    assert upload.header.options.python == "3.11"
    assert upload.header.options.skip_dependency_install is True
    # Random bytes do not compress: the tar needs several chunks, none above 1 MiB.
    assert len(upload.chunk_sizes) >= 3
    assert max(upload.chunk_sizes) <= CHUNK_SIZE
    assert set(upload.files) == EXPECTED_FILES
    for rel in EXPECTED_FILES - {"more/labels.txt"}:
        assert upload.files[rel] == (model / rel).read_bytes(), rel
    assert upload.files["more/labels.txt"] == upload.files["data/nested/labels.txt"]
    assert upload.member_types <= {tarfile.REGTYPE, tarfile.DIRTYPE}
    assert fake.servicer.seen[-1][1]["authorization"] == f"Bearer {TOKEN}"
    client.close()


def test_packing_is_deterministic_and_keeps_modes(model: Path) -> None:
    first, second = pack_folder(model), pack_folder(model)
    with first.archive, second.archive:
        data = first.archive.read()
        assert data == second.archive.read()
    assert first.archive_bytes == len(data)
    assert set(first.files) == EXPECTED_FILES
    assert first.files == sorted(first.files)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["run.sh"].mode == 0o755
    assert members["serve.py"].mode == 0o644
    assert members["data/empty"].isdir()
    assert {m.mtime for m in members.values()} == {0}
    assert {m.uname for m in members.values()} == {""}


def test_symlink_leading_outside_is_refused_before_any_upload(model: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    (model / "data" / "creds").symlink_to(secret)
    with pytest.raises(ModelFolderError) as info:
        pack_folder(model)
    message = str(info.value)
    assert f"{model / 'data' / 'creds'} is a symlink to {secret}" in message
    assert "outside the model folder" in message
    assert "\n" not in message
    assert info.value.code == "INVALID_ARGUMENT"


def test_relative_symlink_escaping_and_loops_are_refused(model: Path) -> None:
    (model / "up").symlink_to("../..", target_is_directory=True)
    with pytest.raises(ModelFolderError, match="outside the model folder"):
        pack_folder(model)
    (model / "up").unlink()
    (model / "data" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(ModelFolderError, match="a loop"):
        pack_folder(model)
    (model / "data" / "loop").unlink()
    (model / "dangling").symlink_to("no-such-file")
    with pytest.raises(ModelFolderError, match="broken symlink"):
        pack_folder(model)


def test_special_files_are_refused(model: Path) -> None:
    os.mkfifo(model / "pipe")
    with pytest.raises(ModelFolderError, match="is a named pipe; only folders and regular files"):
        pack_folder(model)


async def test_missing_folder_or_file_is_a_clear_client_error(fake: Fake, tmp_path: Path) -> None:
    client = Client(home=fake.home)
    with pytest.raises(ModelFolderError, match=r"model folder .*nowhere does not exist"):
        await run(client.images.build, tmp_path / "nowhere", name="iris")
    file = tmp_path / "serve.py"
    file.write_text("")
    with pytest.raises(ModelFolderError, match="is not a folder"):
        await run(client.images.build, file, name="iris")
    assert fake.servicer.seen == []


async def test_cli_build_refusals_are_one_line(fake: Fake, model: Path, tmp_path: Path) -> None:
    line = assert_one_line_error(
        await shipyard(fake.home, "image", "build", str(tmp_path / "nowhere"), "--name", "x")
    )
    assert line == f"error: model folder {tmp_path / 'nowhere'} does not exist"
    (model / "evil").symlink_to("/etc/passwd")
    line = assert_one_line_error(
        await shipyard(fake.home, "image", "build", str(model), "--name", "x", "--json")
    )
    assert "is a symlink to /etc/passwd, outside the model folder" in line
    assert fake.servicer.seen == []


async def test_server_refusal_reaches_the_user_verbatim(fake: Fake, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = assert_one_line_error(
        await shipyard(fake.home, "image", "build", str(tmp_path / "empty"), "--name", "x")
    )
    assert line == (
        "error: serve.py is missing: add it with load(model_dir) and predict(model, payload)"
    )


# Following a build.


async def test_wait_calls_on_log_in_order_and_returns_the_final_build(
    fake: Fake, model: Path
) -> None:
    client = Client(home=fake.home)
    build = await run(client.images.build, model, name="iris")
    seen: list[str] = []
    done = await run(client.images.wait, build.build_id, on_log=seen.append)
    assert seen == GOOD_LOG
    assert done.state == "succeeded"
    assert done.image == "iris:3"
    assert done.seconds == pytest.approx(12.3)
    assert list(await run(lambda: list(client.images.logs(build.build_id)))) == GOOD_LOG


async def test_wait_outlasts_a_lagging_read_model_without_repeating_lines(
    fake: Fake, model: Path
) -> None:
    client = Client(home=fake.home)
    build = await run(client.images.build, model, name="laggy")
    seen: list[str] = []
    done = await run(client.images.wait, build.build_id, on_log=seen.append)
    assert done.succeeded
    assert seen == GOOD_LOG  # the log was streamed again, but each line is reported once
    assert fake.servicer.methods().count("StreamBuildLogs") >= 2


async def test_wait_raises_build_failed_with_reason_and_tail(fake: Fake, model: Path) -> None:
    client = Client(home=fake.home)
    build = await run(client.images.build, model, name="broken")
    seen: list[str] = []
    with pytest.raises(BuildFailed) as info:
        await run(client.images.wait, build.build_id, on_log=seen.append)
    err = info.value
    assert seen == BAD_LOG
    assert err.build.state == "failed"
    assert err.reason == FAILURE
    assert str(err) == (
        f"build {build.build_id} failed: {FAILURE} "
        "(log tail: resolving requirements | calling predict() on the example input)"
    )
    assert err.code == "BUILD_FAILED"
    assert err.to_dict()["service"] == "imagebuild"


async def test_wait_timeout_is_deadline_exceeded_naming_the_build(fake: Fake, model: Path) -> None:
    client = Client(home=fake.home)
    build = await run(client.images.build, model, name="slow")
    seen: list[str] = []
    with pytest.raises(DeadlineExceeded) as info:
        await run(client.images.wait, build.build_id, timeout=0.5, on_log=seen.append)
    assert seen == GOOD_LOG
    assert str(info.value) == (
        f"build {build.build_id} did not end within 0.5s "
        f"(it goes on: `shipyard image logs {build.build_id} --follow`)"
    )


async def test_unknown_build_is_not_found(fake: Fake) -> None:
    client = Client(home=fake.home)
    with pytest.raises(NotFound, match="build nope not found"):
        await run(client.images.get_build, "nope")
    with pytest.raises(NotFound, match="build nope not found"):
        await run(lambda: list(client.images.logs("nope")))


# The catalog through the client.


async def test_catalog_calls_convert_to_dataclasses(fake: Fake) -> None:
    images = Client(home=fake.home).images
    latest = await run(images.get, "iris")
    assert isinstance(latest, Image)
    assert latest.ref == "iris:2"
    assert [p.name for p in latest.packages] == ["scikit-learn", "shipyard-runtime"]
    assert latest.created_at is not None and latest.created_at.tzinfo is not None
    assert latest.to_dict()["packages"][0] == {"name": "scikit-learn", "version": "1.5.2"}
    assert [i.ref for i in await run(images.list_images, name="iris")] == ["iris:1", "iris:2"]
    assert (latest.kind, latest.image_ref) == ("pack", "")
    oci = await run(images.get, "iris-k8s:1")
    assert (oci.kind, oci.image_ref, oci.pack_url) == ("oci", OCI_REF, "")
    assert oci.to_dict()["image_ref"] == OCI_REF
    usage = await run(images.usage, "iris:2")
    assert usage.deployments == ["iris-prod", "iris-canary"]
    assert await run(images.readme, "iris:2") == "# Iris\n\nFlowers.\n"
    saved = await run(images.set_readme, "iris:1", "# One\n")
    assert saved.image == "iris:1" and saved.updated_by == "admin"
    assert await run(images.readme, "iris:1") == "# One\n"
    with pytest.raises(FailedPrecondition, match="iris:2 is used by iris-prod, iris-canary"):
        await run(images.delete, "iris:2")
    await run(images.delete, "iris:1")
    with pytest.raises(NotFound, match="image iris:1 not found"):
        await run(images.get, "iris:1")


async def test_image_refs_are_checked_locally(fake: Fake) -> None:
    images = Client(home=fake.home).images
    assert split_image("iris:3") == ("iris", 3)
    assert split_image("iris") == ("iris", None)
    for bad in ("", ":1", "iris:", "iris:latest"):
        with pytest.raises(InvalidArgument, match="expected NAME or NAME:VERSION"):
            await run(images.get, bad)
    with pytest.raises(InvalidArgument, match="delete needs NAME:VERSION"):
        await run(images.delete, "iris")
    assert fake.servicer.seen == []


# The CLI.


async def test_cli_build_prints_id_log_and_result(fake: Fake, model: Path) -> None:
    result = await shipyard(fake.home, "image", "build", str(model), "--name", "iris")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "build b-0001 queued (iris, group team-a)"
    assert lines[1:-1] == GOOD_LOG
    assert lines[-1] == "built iris:3 (sha256:ab12ab12ab12, 145 MiB, 12.3 s)"
    assert result.stderr == ""


async def test_cli_build_cache_hit(fake: Fake, model: Path) -> None:
    result = await shipyard(fake.home, "image", "build", str(model), "--name", "cached")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "cached:1 is up to date (cache hit)"
    assert "StreamBuildLogs" not in fake.servicer.methods()


async def test_cli_build_failure_exits_1_with_the_reason(fake: Fake, model: Path) -> None:
    result = await shipyard(fake.home, "image", "build", str(model), "--name", "broken")
    line = assert_one_line_error(result)
    assert line == f"error: build b-0001 failed: {FAILURE}"
    assert result.stdout.splitlines()[1:] == BAD_LOG


async def test_cli_build_json_keeps_stdout_parseable(fake: Fake, model: Path) -> None:
    result = await shipyard(fake.home, "image", "build", str(model), "--name", "iris", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["build"]["state"] == "succeeded"
    assert data["image"]["digest"] == DIGEST
    assert result.stderr.splitlines() == ["build b-0001 queued (iris, group team-a)", *GOOD_LOG]
    failed = await shipyard(fake.home, "image", "build", str(model), "--name", "broken", "--json")
    assert failed.exit_code == 1
    assert json.loads(failed.stdout)["build"]["reason"] == FAILURE
    assert failed.stderr.splitlines()[-1] == f"error: build b-0002 failed: {FAILURE}"


async def test_cli_build_no_wait(fake: Fake, model: Path) -> None:
    text = await shipyard(fake.home, "image", "build", str(model), "--name", "iris", "--no-wait")
    assert text.exit_code == 0
    assert text.stdout == "build b-0001 queued (iris, group team-a)\n"
    assert "shipyard image logs b-0001 --follow" in text.stderr
    as_json = await shipyard(
        fake.home, "image", "build", str(model), "--name", "iris", "--no-wait", "--json"
    )
    data = json.loads(as_json.stdout)
    assert data["build"]["state"] == "queued" and data["image"] is None
    assert "StreamBuildLogs" not in fake.servicer.methods()


JSON_COMMANDS = [
    ["image", "list"],
    ["image", "list", "--group", "team-a", "--name", "iris"],
    ["image", "show", "iris"],
    ["image", "show", "iris:1", "--group", "team-a"],
    ["image", "builds"],
    ["image", "usage", "iris:2"],
    ["image", "readme", "iris:2"],
    ["image", "delete", "iris:1", "--yes"],
]


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=lambda a: " ".join(a[:3]))
async def test_json_output_is_valid_json(fake: Fake, args: list[str]) -> None:
    await assert_json_output(fake.home, *args)


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=lambda a: " ".join(a[:3]))
async def test_text_output_works(fake: Fake, args: list[str]) -> None:
    await assert_text_output(fake.home, *args)


async def test_list_and_show_text(fake: Fake) -> None:
    listed = await shipyard(fake.home, "image", "list")
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["NAME:VERSION", "GROUP", "SIZE", "PYTHON", "CREATED", "BY"]
    assert rows[1][:5] == ["iris:1", "team-a", "145", "MiB", "3.11"]
    shown = await shipyard(fake.home, "image", "show", "iris")
    assert "image:" in shown.stdout and "iris:2" in shown.stdout
    assert DIGEST in shown.stdout
    assert ["scikit-learn", "1.5.2"] in [line.split() for line in shown.stdout.splitlines()]
    missing = await shipyard(fake.home, "image", "show", "nope:1")
    assert assert_one_line_error(missing) == "error: image nope:1 not found"


def _fields(stdout: str) -> dict[str, str]:
    """The ``name: value`` lines of ``show`` (before the packages table)."""
    head = stdout.split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in head.splitlines())}


async def test_show_says_the_kind_and_where_the_image_is(fake: Fake) -> None:
    pack = _fields((await shipyard(fake.home, "image", "show", "iris:2")).stdout)
    assert pack["kind"] == "pack"
    assert pack["pack"] == "file:///packs/iris-2.tar.zst" and "reference" not in pack
    assert pack["size"] == f"145 MiB ({145 * 1024 * 1024} bytes)"

    oci = _fields((await shipyard(fake.home, "image", "show", "iris-k8s:1")).stdout)
    assert oci["kind"] == "oci"
    assert oci["reference"] == OCI_REF and "pack" not in oci
    assert oci["digest"] == DIGEST
    assert oci["size"] == "-"  # the registry knows it, the build does not
    listed = await shipyard(fake.home, "image", "list", "--name", "iris-k8s")
    assert listed.stdout.splitlines()[1].split()[:4] == ["iris-k8s:1", "team-a", "-", "3.11"]

    as_json = json.loads((await shipyard(fake.home, "image", "show", "iris-k8s", "--json")).stdout)
    assert (as_json["kind"], as_json["image_ref"], as_json["pack_url"]) == ("oci", OCI_REF, "")


async def test_logs_and_follow(fake: Fake, model: Path) -> None:
    await shipyard(fake.home, "image", "build", str(model), "--name", "iris", "--no-wait")
    followed = await shipyard(fake.home, "image", "logs", "b-0001", "--follow")
    assert followed.stdout.splitlines() == GOOD_LOG
    as_json = await shipyard(fake.home, "image", "logs", "b-0001", "--json")
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(x["seq"], x["line"]) for x in lines] == list(enumerate(GOOD_LOG, start=1))
    builds = await shipyard(fake.home, "image", "builds", "--json")
    assert [b["state"] for b in json.loads(builds.stdout)] == ["succeeded"]


async def test_usage_text(fake: Fake) -> None:
    used = await shipyard(fake.home, "image", "usage", "iris:2")
    assert used.stdout.splitlines() == [
        "iris:2 is used by 2 deployments:",
        "  iris-prod",
        "  iris-canary",
    ]
    unused = await shipyard(fake.home, "image", "usage", "iris:1")
    assert unused.stdout == "iris:1 is not used by any deployment\n"


async def test_readme_print_set_from_file_stdin_and_editor(fake: Fake, tmp_path: Path) -> None:
    printed = await shipyard(fake.home, "image", "readme", "iris:2")
    assert printed.stdout == "# Iris\n\nFlowers.\n"
    source = tmp_path / "README.md"
    source.write_text("# From a file\n")
    result = await shipyard(fake.home, "image", "readme", "iris:1", "--set", str(source))
    assert result.exit_code == 0, result.output
    assert fake.servicer.readmes["iris:1"].markdown == "# From a file\n"
    piped = await shipyard(
        fake.home, "image", "readme", "iris:1", "--set", "-", "--json", input="# Piped\n"
    )
    assert json.loads(piped.stdout)["markdown"] == "# Piped\n"
    edited = await shipyard(
        fake.home, "image", "readme", "iris:1", "--edit", env={"EDITOR": "sed -i s/Piped/Edited/"}
    )
    assert edited.exit_code == 0, edited.output
    assert fake.servicer.readmes["iris:1"].markdown == "# Edited\n"
    unchanged = await shipyard(
        fake.home, "image", "readme", "iris:1", "--edit", env={"EDITOR": "true"}
    )
    assert unchanged.exit_code == 0
    assert "readme unchanged" in unchanged.stderr
    both = await shipyard(fake.home, "image", "readme", "iris:1", "--edit", "--set", str(source))
    assert "exclude each other" in assert_one_line_error(both, exit_code=2)


async def test_delete_confirms_unless_yes(fake: Fake) -> None:
    refused = await shipyard(fake.home, "image", "delete", "iris:1", input="n\n")
    assert refused.exit_code == 1
    assert refused.stderr.splitlines() == [
        "Delete image iris:1? This cannot be undone [y/N]: n",
        "error: aborted",
    ]
    assert "iris:1" in fake.servicer.images
    confirmed = await shipyard(fake.home, "image", "delete", "iris:1", input="y\n")
    assert confirmed.exit_code == 0
    assert confirmed.stdout == "deleted iris:1\n"
    assert "iris:1" not in fake.servicer.images


async def test_delete_json_without_yes_is_a_usage_error(fake: Fake) -> None:
    line = assert_one_line_error(
        await shipyard(fake.home, "image", "delete", "iris:1", "--json"), exit_code=2
    )
    assert "--json needs --yes" in line
    assert fake.servicer.seen == []


async def test_delete_needs_a_version_and_an_unused_image(fake: Fake) -> None:
    line = assert_one_line_error(
        await shipyard(fake.home, "image", "delete", "iris", "--yes"), exit_code=2
    )
    assert "NAME:VERSION" in line
    used = await shipyard(fake.home, "image", "delete", "iris:2", "--yes")
    assert assert_one_line_error(used) == (
        "error: iris:2 is used by iris-prod, iris-canary: delete or update them first"
    )


async def test_unreachable_service_is_one_line(
    tmp_path: Path, model: Path, unused_port: int
) -> None:
    port = unused_port
    write_config(tmp_path, TOKEN, {"imagebuild": f"127.0.0.1:{port}"})
    for args in (["image", "list"], ["image", "build", str(model), "--name", "iris", "--json"]):
        line = assert_one_line_error(await shipyard(tmp_path, *args))
        assert f"cannot reach the imagebuild service at 127.0.0.1:{port}" in line


async def test_help_lists_the_image_commands(fake: Fake) -> None:
    result = await shipyard(fake.home, "image", "--help")
    assert result.exit_code == 0
    for verb in ("build", "list", "show", "logs", "builds", "usage", "readme", "delete"):
        assert verb in result.stdout
