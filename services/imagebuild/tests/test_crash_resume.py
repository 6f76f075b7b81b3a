"""A builder killed with SIGKILL mid-build: another one resumes the build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from shipyard.imagebuild.v1 import imagebuild_pb2 as pb
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc
from shipyard_core.grpckit.server import ServiceHost
from shipyard_imagebuild.main import build
from shipyard_imagebuild.settings import ImageBuildSettings
from shipyard_testing import StaticAuthenticator, wait_for

from .test_service import TOKENS, _md, _start, _tar

SLOW = {
    "serve.py": "import time\n\ndef load(model_dir):\n    time.sleep(4)\n    return None\n\n"
    "def predict(model, payload):\n    return payload\n",
    "shipyard.yaml": "example_input: [1]\n",
}


@pytest.fixture
async def api_only(
    database_url: str, nats_url: str, tmp_path: Path
) -> AsyncIterator[tuple[ServiceHost, dict[str, str]]]:
    """An API replica that does not build, and the env for builder processes."""
    settings = ImageBuildSettings(
        database_url=database_url,
        nats_url=nats_url,
        grpc_port=0,
        data_dir=tmp_path,
        build_concurrency=0,
    )
    env = {
        **os.environ,
        "SHIPYARD_DATABASE_URL": database_url,
        "SHIPYARD_NATS_URL": nats_url,
        "SHIPYARD_DATA_DIR": str(tmp_path),
        "SHIPYARD_GRPC_PORT": "0",
        "SHIPYARD_BUILD_ACK_WAIT_SECONDS": "2",
        "SHIPYARD_LOG_LEVEL": "WARNING",
    }
    host = await build(settings, StaticAuthenticator(TOKENS))
    async with host:
        yield host, env


def _builder(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "shipyard_imagebuild"], env=env)


async def test_a_killed_builder_is_resumed_by_another(
    api_only: tuple[ServiceHost, dict[str, str]],
) -> None:
    host, env = api_only
    first = _builder(env)
    procs = [first]
    try:
        async with grpc.aio.insecure_channel(host.address) as ch:
            stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
            started = await _start(stub, "ana", "slow", _tar(files=SLOW))

            async def state() -> pb.Build:
                return await stub.GetBuild(
                    pb.GetBuildRequest(build_id=started.build_id), metadata=_md("ana")
                )

            async def building() -> bool:
                b = await state()
                return b.state == pb.BUILD_STATE_BUILDING and b.attempts == 1

            await wait_for(building, timeout=60, message="the first builder never started")
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            second = _builder(env)
            procs.append(second)

            async def done() -> pb.Build | None:
                b = await state()
                return b if b.state in (pb.BUILD_STATE_SUCCEEDED, pb.BUILD_STATE_FAILED) else None

            final = await wait_for(done, timeout=120, interval=0.2, message="never resumed")
            assert final.state == pb.BUILD_STATE_SUCCEEDED, final.reason + final.log_tail
            assert final.attempts == 2 and final.image == "slow:1"
            images = await stub.ListImages(pb.ListImagesRequest(name="slow"), metadata=_md("ana"))
            assert [i.version for i in images.images] == [1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
