"""bench/imagebuild: how long an image build takes, through the real service.

Starts embedded PostgreSQL and NATS, keys and imagebuild as their own processes, then
builds ``examples/iris`` through ``StartBuild`` as the CLI does:

1. first build with an empty wheel cache (what a brand-new machine sees);
2. a cold build with a warm wheel cache: the same model with one file changed, so the
   environment is built, checked and packed again but wheels come from uv's cache
   (target < 30 s);
3. a cache hit: the identical folder again (target < 1 s, upload included);
4. the pack's size.

Run: ``./dev bench imagebuild``.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from bench._machine import describe
from bench._stack import running
from shipyard.imagebuild.v1 import imagebuild_pb2 as pb
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc

IRIS = Path(__file__).resolve().parent.parent / "examples" / "iris"
RESULTS = Path(__file__).parent / "results" / "imagebuild.json"


def _tar(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(folder)))
    return buf.getvalue()


async def _build(stub: Any, md: Any, name: str, data: bytes) -> tuple[pb.Build, float, float]:
    """Builds; returns (final build, seconds to the StartBuild answer, seconds to the end)."""

    async def parts() -> AsyncIterator[pb.StartBuildRequest]:
        yield pb.StartBuildRequest(header=pb.StartBuildHeader(group="bench", name=name))
        for i in range(0, len(data), 1 << 20):
            yield pb.StartBuildRequest(chunk=data[i : i + (1 << 20)])

    started = time.perf_counter()
    build = await stub.StartBuild(parts(), metadata=md)
    answered = time.perf_counter() - started
    async for _ in stub.StreamBuildLogs(
        pb.StreamBuildLogsRequest(build_id=build.build_id, follow=True), metadata=md
    ):
        pass
    build = await stub.GetBuild(pb.GetBuildRequest(build_id=build.build_id), metadata=md)
    if build.state != pb.BUILD_STATE_SUCCEEDED:
        raise RuntimeError(f"build failed: {build.reason}\n{build.log_tail}")
    return build, answered, time.perf_counter() - started


async def run(quick: bool = False) -> dict[str, Any]:
    """Runs the measurements and writes bench/results/imagebuild.json."""
    async with running({"shipyard_imagebuild": {}}) as stack:
        md = stack.metadata
        results: dict[str, Any] = {"machine": describe()}
        with tempfile.TemporaryDirectory() as tmp:
            changed = Path(tmp) / "iris"
            shutil.copytree(IRIS, changed, ignore=shutil.ignore_patterns("__pycache__"))
            (changed / "NOTES.md").write_text("changed, so that the folder digest differs\n")
            async with grpc.aio.insecure_channel(stack.addresses["shipyard_imagebuild"]) as ch:
                stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)
                first, _, first_s = await _build(stub, md, "iris", _tar(IRIS))
                _, _, warm_s = await _build(stub, md, "iris-changed", _tar(changed))
                hit, hit_answer_s, _ = await _build(stub, md, "iris", _tar(IRIS))
                image = await stub.GetImage(
                    pb.GetImageRequest(group="bench", image="iris:1"), metadata=md
                )
        results.update(
            {
                "first_build_empty_wheel_cache_seconds": round(first_s, 2),
                "cold_build_warm_wheel_cache_seconds": round(warm_s, 2),
                "cache_hit_seconds": round(hit_answer_s, 3),
                "cache_hit_was_hit": hit.cache_hit and hit.version == first.version,
                "pack_size_mib": round(image.size_bytes / (1 << 20), 1),
                "packages": len(image.packages),
            }
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results
