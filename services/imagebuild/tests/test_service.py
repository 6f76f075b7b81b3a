"""ImageBuildService end to end: real gRPC, PostgreSQL, NATS, uv and scikit-learn."""

from __future__ import annotations

import io
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from shipyard.imagebuild.v1 import imagebuild_pb2 as pb
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc
from shipyard_core.auth import Principal
from shipyard_core.grpckit.server import ServiceHost
from shipyard_imagebuild.main import build
from shipyard_imagebuild.settings import ImageBuildSettings
from shipyard_testing import StaticAuthenticator, wait_for

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
TOKENS = {
    "ana": Principal("ana", False, frozenset({"team-a"})),
    "bob": Principal("bob", False, frozenset({"team-b"})),
}


@pytest.fixture(scope="module")
def uv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel cache for the module, as a real builder keeps one across builds."""
    return tmp_path_factory.mktemp("uv-cache")


@pytest.fixture
async def host(
    database_url: str, nats_url: str, tmp_path: Path, uv_cache: Path
) -> AsyncIterator[ServiceHost]:
    settings = ImageBuildSettings(
        database_url=database_url,
        nats_url=nats_url,
        grpc_port=0,
        data_dir=tmp_path,
        uv_cache_dir=uv_cache,
    )
    h = await build(settings, StaticAuthenticator(TOKENS), ack_wait=3.0)
    async with h:
        yield h


def _tar(folder: Path | None = None, files: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if folder is not None:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    tar.add(path, arcname=str(path.relative_to(folder)))
        for name, text in (files or {}).items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def _start(
    stub: imagebuild_pb2_grpc.ImageBuildServiceStub,
    token: str,
    name: str,
    data: bytes,
    **kw: object,
) -> pb.Build:
    async def parts() -> AsyncIterator[pb.StartBuildRequest]:
        yield pb.StartBuildRequest(header=pb.StartBuildHeader(name=name, **kw))  # type: ignore[arg-type]
        for i in range(0, len(data), 256 * 1024):
            yield pb.StartBuildRequest(chunk=data[i : i + 256 * 1024])

    return await stub.StartBuild(parts(), metadata=(("authorization", f"Bearer {token}"),))


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _finished(
    stub: imagebuild_pb2_grpc.ImageBuildServiceStub, build_id: str, deadline: float = 240
) -> pb.Build:
    async def done() -> pb.Build | None:
        b = await stub.GetBuild(pb.GetBuildRequest(build_id=build_id), metadata=_md("ana"))
        return b if b.state in (pb.BUILD_STATE_SUCCEEDED, pb.BUILD_STATE_FAILED) else None

    return await wait_for(done, timeout=deadline, interval=0.2, message="build did not finish")


ECHO = {
    "serve.py": "def load(model_dir):\n    return None\n\n"
    "def predict(model, payload):\n    return payload\n",
    "shipyard.yaml": "example_input: [1, 2]\n",
}


async def test_iris_builds_then_answers_from_the_cache(host: ServiceHost) -> None:
    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        first = await _start(
            stub, "ana", "iris", _tar(EXAMPLES / "iris"), source_name="examples/iris"
        )
        # A free builder may pick the build up before the answer is read back.
        assert first.state in (pb.BUILD_STATE_QUEUED, pb.BUILD_STATE_BUILDING), first
        assert first.group == "team-a" and not first.cache_hit
        done = await _finished(stub, first.build_id)
        assert done.state == pb.BUILD_STATE_SUCCEEDED, done.reason + "\n" + done.log_tail
        assert done.image == "iris:1" and not done.cache_hit

        image = await stub.GetImage(pb.GetImageRequest(image="iris:1"), metadata=_md("ana"))
        assert image.digest and image.size_bytes > 0 and image.script == "serve.py"
        # A local build makes an environment pack: its key, no OCI reference.
        assert image.kind == "pack" and image.image_ref == ""
        assert image.pack_url == f"packs/sha256/{image.digest}", image.pack_url
        assert "scikit-learn" in {p.name for p in image.packages}
        assert image.python.startswith("3.")

        logs = [
            line.line
            async for line in stub.StreamBuildLogs(
                pb.StreamBuildLogsRequest(build_id=first.build_id), metadata=_md("ana")
            )
        ]
        assert any("scikit-learn" in line for line in logs), logs[-20:]

        # Identical inputs: answered at once, same version, no rebuild.
        again = await _start(stub, "ana", "iris", _tar(EXAMPLES / "iris"))
        assert again.state == pb.BUILD_STATE_SUCCEEDED and again.cache_hit
        assert again.version == 1
        # The same folder under another name reuses the pack: a new image, no rebuild.
        other = await _start(stub, "ana", "iris-copy", _tar(EXAMPLES / "iris"))
        assert other.cache_hit and other.image == "iris-copy:1"
        copy = await stub.GetImage(pb.GetImageRequest(image="iris-copy"), metadata=_md("ana"))
        assert copy.digest == image.digest

        # Bob (team-b) sees none of it.
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await stub.GetBuild(pb.GetBuildRequest(build_id=first.build_id), metadata=_md("bob"))
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.ListImages(pb.ListImagesRequest(), metadata=_md("bob"))
        assert list(listed.images) == []
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ListImages(pb.ListImagesRequest(group="team-a"), metadata=_md("bob"))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_contract_errors_are_named_at_upload(host: ServiceHost) -> None:
    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await _start(stub, "ana", "empty", _tar(files={"model.txt": "x"}))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "serve.py" in (bad.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as bad_name:
            await _start(stub, "ana", "Iris!", _tar(files=ECHO))
        assert bad_name.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "name" in (bad_name.value.details() or "")


async def test_a_failing_predict_fails_the_build_with_its_reason(host: ServiceHost) -> None:
    broken = {
        "serve.py": "def load(model_dir):\n    return None\n\n"
        "def predict(model, payload):\n"
        "    raise ValueError(f'expected 4 features, got {len(payload[0])}')\n",
        "shipyard.yaml": "example_input: [[1, 2, 3]]\n",
    }
    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        started = await _start(stub, "ana", "broken", _tar(files=broken))
        done = await _finished(stub, started.build_id)
        assert done.state == pb.BUILD_STATE_FAILED
        assert "expected 4 features, got 3" in done.reason
        assert done.log_tail
        images = await stub.ListImages(pb.ListImagesRequest(name="broken"), metadata=_md("ana"))
        assert list(images.images) == []


async def test_readme_and_delete(host: ServiceHost) -> None:
    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        started = await _start(stub, "ana", "echo", _tar(files={**ECHO, "README.md": "# Echo\n"}))
        done = await _finished(stub, started.build_id)
        assert done.state == pb.BUILD_STATE_SUCCEEDED, done.reason + "\n" + done.log_tail
        readme = await stub.GetReadme(pb.GetReadmeRequest(image="echo:1"), metadata=_md("ana"))
        assert readme.markdown == "# Echo\n"
        await stub.SetReadme(
            pb.SetReadmeRequest(image="echo:1", markdown="## Changed"), metadata=_md("ana")
        )
        readme = await stub.GetReadme(pb.GetReadmeRequest(image="echo"), metadata=_md("ana"))
        assert readme.markdown == "## Changed" and readme.updated_by == "ana"
        with pytest.raises(grpc.aio.AioRpcError) as need_version:
            await stub.DeleteImage(pb.DeleteImageRequest(image="echo"), metadata=_md("ana"))
        assert need_version.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await stub.DeleteImage(pb.DeleteImageRequest(image="echo:1"), metadata=_md("ana"))
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.GetImage(pb.GetImageRequest(image="echo:1"), metadata=_md("ana"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        # a rebuild makes version 2: deleted numbers are never reused
        again = await _start(stub, "ana", "echo", _tar(files={**ECHO, "README.md": "# Echo\n"}))
        done = await _finished(stub, again.build_id)
        assert done.image == "echo:2"


@pytest.mark.parametrize("example", ["iris-oci", "iris-onnx"])
async def test_the_other_examples_build_and_predict(host: ServiceHost, example: str) -> None:
    """A successful build ran predict() on the example input inside the new environment."""
    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
        started = await _start(stub, "ana", example, _tar(EXAMPLES / example))
        done = await _finished(stub, started.build_id)
        assert done.state == pb.BUILD_STATE_SUCCEEDED, done.reason + "\n" + done.log_tail
        logs = [
            line.line
            async for line in stub.StreamBuildLogs(
                pb.StreamBuildLogsRequest(build_id=started.build_id), metadata=_md("ana")
            )
        ]
        assert any("check passed at stage predict" in line for line in logs), logs[-10:]
        image = await stub.GetImage(pb.GetImageRequest(image=example), metadata=_md("ana"))
        assert image.script == ("score.py" if example == "iris-oci" else "serve.py")
