"""One real stack per test module: PostgreSQL, NATS, quota, imagebuild and the scheduler
with the local backend, in this process; images are built once per module."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from shipyard.imagebuild.v1 import imagebuild_pb2 as ib
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc
from shipyard.quota.v1 import quota_pb2 as qp
from shipyard.quota.v1 import quota_pb2_grpc
from shipyard.scheduler.v1 import scheduler_pb2_grpc
from shipyard_core.auth import InternalTokenAuthenticator, Principal
from shipyard_core.embedded import start_nats
from shipyard_core.embedded.postgres import PostgresProcess
from shipyard_core.grpckit.server import ServiceHost
from shipyard_imagebuild.main import build as build_imagebuild
from shipyard_imagebuild.settings import ImageBuildSettings
from shipyard_quota.main import build as build_quota
from shipyard_quota.settings import QuotaSettings
from shipyard_scheduler.main import Scheduler, build_scheduler
from shipyard_scheduler.settings import SchedulerSettings
from shipyard_testing import StaticAuthenticator, folder_tar, wait_for

INTERNAL = "internal-secret"
TOKENS = {
    "admin": Principal("root", True, frozenset()),
    "ana": Principal("ana", False, frozenset({"team-a"})),
    "bob": Principal("bob", False, frozenset({"team-b"})),
}

# Echoes its payload with the model's version; `crash` fails in the model server (and
# only there: the build's check runs `shipyard_runtime check`, which passes).
SERVE = """\
import pathlib, sys, time

def load(model_dir):
    if (pathlib.Path(model_dir) / "CRASH").exists() and "serve" in sys.argv:
        print("loading the model...", flush=True)
        raise ValueError("expected 4 features, got 3")
    return (pathlib.Path(model_dir) / "VERSION").read_text().strip()

def predict(model, payload):
    if isinstance(payload, dict) and "sleep" in payload:
        time.sleep(payload["sleep"])
    return {"version": model, "echo": payload}
"""


def md(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a test user."""
    return (("authorization", f"Bearer {token}"),)


async def build_image(address: str, name: str, files: dict[str, str]) -> str:
    """Builds an image as ana (team-a) and returns ``name:version``."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)

        async def parts() -> AsyncIterator[ib.StartBuildRequest]:
            yield ib.StartBuildRequest(header=ib.StartBuildHeader(name=name))
            yield ib.StartBuildRequest(chunk=folder_tar(files))

        started = await stub.StartBuild(parts(), metadata=md("ana"))

        async def done() -> ib.Build | None:
            b = await stub.GetBuild(
                ib.GetBuildRequest(build_id=started.build_id), metadata=md("ana")
            )
            return b if b.state in (ib.BUILD_STATE_SUCCEEDED, ib.BUILD_STATE_FAILED) else None

        b = await wait_for(
            done, timeout=240, interval=0.2, message=f"build of {name} did not finish"
        )
        assert b.state == ib.BUILD_STATE_SUCCEEDED, b.reason + "\n" + b.log_tail
        return b.image


@dataclass
class Stack:
    """The running parts and what tests need of them."""

    quota: ServiceHost
    imagebuild: ServiceHost
    scheduler: Scheduler
    settings: SchedulerSettings
    nats_url: str
    database_url: str
    images: dict[str, str]

    @property
    def address(self) -> str:
        """The scheduler's gRPC address."""
        return self.scheduler.host.address

    def channel(self) -> grpc.aio.Channel:
        """A channel to the scheduler."""
        return grpc.aio.insecure_channel(self.address)

    def stub(self, channel: grpc.aio.Channel) -> scheduler_pb2_grpc.SchedulerServiceStub:
        """The scheduler's stub on ``channel``."""
        return scheduler_pb2_grpc.SchedulerServiceStub(channel)


@pytest.fixture(scope="module")
async def stack(postgres_server: PostgresProcess) -> AsyncIterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="shipyard-sched-"))
    db_name = f"t_{uuid.uuid4().hex[:20]}"
    database_url = postgres_server.create_database(db_name)
    nats = start_nats(root / "nats")
    auth = StaticAuthenticator(TOKENS)
    common = {"database_url": database_url, "nats_url": nats.url, "grpc_port": 0, "data_dir": root}
    quota = await build_quota(QuotaSettings(**common), auth)  # type: ignore[arg-type]
    imagebuild = await build_imagebuild(
        ImageBuildSettings(**common, uv_cache_dir=root / "uv-cache"),
        auth,  # type: ignore[arg-type]
    )
    try:
        async with quota, imagebuild:
            async with grpc.aio.insecure_channel(quota.address) as ch:
                q = quota_pb2_grpc.QuotaServiceStub(ch)
                await q.SetInstanceType(
                    qp.SetInstanceTypeRequest(
                        instance_type=qp.InstanceType(name="cpu.small", cpu=0.5, memory_gib=0.5)
                    ),
                    metadata=md("admin"),
                )
                for group in ("team-a", "team-b"):
                    await q.SetGroupQuota(
                        qp.SetGroupQuotaRequest(
                            group=group, limits=qp.Resources(cpu=2, memory_gib=4, instances=4)
                        ),
                        metadata=md("admin"),
                    )
            images = {
                "v1": await build_image(
                    imagebuild.address, "echo", {"serve.py": SERVE, "VERSION": "v1"}
                ),
                "v2": await build_image(
                    imagebuild.address, "echo", {"serve.py": SERVE, "VERSION": "v2"}
                ),
                "crash": await build_image(
                    imagebuild.address, "crashy", {"serve.py": SERVE, "VERSION": "c", "CRASH": ""}
                ),
            }
            settings = SchedulerSettings(
                **common,  # type: ignore[arg-type]
                quota_addr=quota.address,
                imagebuild_addr=imagebuild.address,
                internal_token=INTERNAL,
                reconcile_interval_seconds=0.2,
                restart_backoff_seconds=0.2,
                max_restarts=2,
                drain_seconds=0.5,
                grace_seconds=3,
                scale_down_delay_seconds=1.0,
                scale_to_zero_after_seconds=2.0,
            )
            scheduler = await build_scheduler(settings, InternalTokenAuthenticator(auth, INTERNAL))
            try:
                async with scheduler.host:
                    yield Stack(
                        quota, imagebuild, scheduler, settings, nats.url, database_url, images
                    )
            finally:
                shutdown = getattr(scheduler.backend, "shutdown_all", None)
                if shutdown is not None:
                    await shutdown()
    finally:
        nats.stop()
