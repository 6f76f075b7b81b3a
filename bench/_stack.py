"""The real suite for benchmarks: embedded PostgreSQL and NATS (fsync on, as `shipyard up`
runs them), an admin token, and services as their own processes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from shipyard.imagebuild.v1 import imagebuild_pb2 as ib
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc
from shipyard.keys.v1 import client_keys_pb2, client_keys_pb2_grpc
from shipyard.quota.v1 import quota_pb2 as qp
from shipyard.quota.v1 import quota_pb2_grpc
from shipyard.scheduler.v1 import scheduler_pb2 as sp
from shipyard.scheduler.v1 import scheduler_pb2_grpc
from shipyard_core.embedded import NatsProcess, PostgresProcess, start_nats, start_postgres
from shipyard_core.embedded._process import free_port
from shipyard_platform.health import grpc_health


@dataclass
class Stack:
    """What a benchmark talks to."""

    home: Path
    pg: PostgresProcess
    nats: NatsProcess
    token: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    http_port: int = 0
    """The gateway's REST port (when the gateway runs)."""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The admin's call metadata."""
        return (("authorization", f"Bearer {self.token}"),)


async def wait_healthy(address: str, deadline: float = 60) -> None:
    """Waits until a gRPC server reports SERVING (the platform's own health check)."""
    end = time.monotonic() + deadline
    while not (await asyncio.to_thread(grpc_health, address))[0]:
        if time.monotonic() > end:
            raise RuntimeError(f"{address} did not become healthy")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running(services: dict[str, dict[str, str]]) -> AsyncIterator[Stack]:
    """Starts keys (always) and ``services`` (module name → extra env) on free ports."""
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-") as tmp:
        home = Path(tmp)
        stack = Stack(
            home, start_postgres(home / "postgres", fsync=True), start_nats(home / "nats")
        )
        try:
            ports = {name: free_port() for name in ("shipyard_keys", *services)}
            stack.http_port = free_port()
            # Every service finds every other one, as under `shipyard up`.
            peers = {
                f"SHIPYARD_{m.removeprefix('shipyard_').upper()}_ADDR": f"127.0.0.1:{port}"
                for m, port in ports.items()
            }
            env = {
                **peers,
                "SHIPYARD_INTERNAL_TOKEN": "bench-internal-token",
                "SHIPYARD_HTTP_PORT": str(stack.http_port),
                "SHIPYARD_GATEWAY_URL": f"http://127.0.0.1:{stack.http_port}",
                **os.environ,
                "SHIPYARD_DATABASE_URL": stack.pg.url,
                "SHIPYARD_NATS_URL": stack.nats.url,
                "SHIPYARD_KEYS_ADDR": f"127.0.0.1:{ports['shipyard_keys']}",
                "SHIPYARD_LOG_LEVEL": "WARNING",
                "SHIPYARD_DATA_DIR": str(home),
            }
            boot = subprocess.run(
                [sys.executable, "-m", "shipyard_keys", "bootstrap-admin", "--name", "admin"],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if boot.returncode != 0:
                raise RuntimeError(f"bootstrap-admin failed: {boot.stderr[-2000:]}")
            stack.token = json.loads(boot.stdout.strip().splitlines()[-1])["token"]
            for module, extra in {"shipyard_keys": {}, **services}.items():
                log = (home / f"{module}.log").open("wb")
                stack.procs[module] = subprocess.Popen(
                    [sys.executable, "-m", module],
                    env={**env, **extra, "SHIPYARD_GRPC_PORT": str(ports[module])},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                stack.addresses[module] = f"127.0.0.1:{ports[module]}"
            for address in stack.addresses.values():
                await wait_healthy(address)
            yield stack
        finally:
            for p in stack.procs.values():
                p.terminate()
            for p in stack.procs.values():
                p.wait(30)
            if "shipyard_scheduler" in stack.procs:  # its model servers outlive it on purpose
                subprocess.run(
                    [sys.executable, "-m", "shipyard_scheduler", "stop-local-instances"],
                    env={**env, "SHIPYARD_GRPC_PORT": "0"},
                    capture_output=True,
                    check=False,
                )
            stack.nats.stop()
            stack.pg.stop()


def tar_folder(folder: Path, replace: Mapping[str, bytes] | None = None) -> bytes:
    """``folder`` as the tar.gz the CLI uploads; ``replace`` swaps files' contents."""
    replace = replace or {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            name = str(path.relative_to(folder))
            if name in replace:
                info = tarfile.TarInfo(name)
                info.size = len(replace[name])
                tar.addfile(info, io.BytesIO(replace[name]))
            else:
                tar.add(path, arcname=name)
    return buf.getvalue()


async def until(check: Callable[[], Awaitable[bool]], deadline: float, what: str) -> None:
    """Polls ``check`` until it is true; RuntimeError naming ``what`` after ``deadline`` s."""
    end = time.monotonic() + deadline
    while not await check():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out: {what}")
        await asyncio.sleep(0.05)


async def build_image(stack: Stack, source: bytes, name: str = "iris") -> str:
    """Creates instance type ``cpu.small`` and group ``bench`` with room for 16
    instances, builds ``source`` (a tar.gz) as ``name`` in it, and returns the image."""
    async with grpc.aio.insecure_channel(stack.addresses["shipyard_quota"]) as ch:
        q = quota_pb2_grpc.QuotaServiceStub(ch)
        await q.SetInstanceType(
            qp.SetInstanceTypeRequest(
                instance_type=qp.InstanceType(name="cpu.small", cpu=0.5, memory_gib=1)
            ),
            metadata=stack.metadata,
        )
        await q.SetGroupQuota(
            qp.SetGroupQuotaRequest(
                group="bench", limits=qp.Resources(cpu=8, memory_gib=16, instances=16)
            ),
            metadata=stack.metadata,
        )
    async with grpc.aio.insecure_channel(stack.addresses["shipyard_imagebuild"]) as ch:
        stub = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)

        async def parts() -> AsyncIterator[ib.StartBuildRequest]:
            yield ib.StartBuildRequest(header=ib.StartBuildHeader(group="bench", name=name))
            yield ib.StartBuildRequest(chunk=source)

        build = await stub.StartBuild(parts(), metadata=stack.metadata)
        done = build

        async def finished() -> bool:
            nonlocal done
            done = await stub.GetBuild(
                ib.GetBuildRequest(build_id=build.build_id), metadata=stack.metadata
            )
            return done.state in (ib.BUILD_STATE_SUCCEEDED, ib.BUILD_STATE_FAILED)

        await until(finished, 600, f"{name} build")
        if done.state != ib.BUILD_STATE_SUCCEEDED:
            raise RuntimeError(f"build failed: {done.reason}")
        return str(done.image)


async def create_deployment(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    stack: Stack,
    name: str,
    image: str,
    *,
    replicas: int = 1,
    private: bool = True,
) -> None:
    """Creates deployment ``name`` of ``image`` in group ``bench`` (instance type
    ``cpu.small``, ``replicas`` fixed) and returns without waiting."""
    await scheduler.CreateDeployment(
        sp.CreateDeploymentRequest(
            name=name,
            group="bench",
            spec=sp.DeploymentSpec(
                image=image,
                instance_type="cpu.small",
                scaling=sp.Scaling(min_replicas=replicas, max_replicas=replicas),
                access=sp.ACCESS_PRIVATE if private else sp.ACCESS_PUBLIC,
            ),
        ),
        metadata=stack.metadata,
    )


async def deploy(
    stack: Stack, name: str, image: str, *, replicas: int = 1, private: bool = True
) -> list[str]:
    """Creates deployment ``name`` of ``image`` in group ``bench`` (instance type
    ``cpu.small``), waits until ``replicas`` instances are ready, and returns their
    addresses."""
    async with grpc.aio.insecure_channel(stack.addresses["shipyard_scheduler"]) as ch:
        s = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        await create_deployment(s, stack, name, image, replicas=replicas, private=private)

        async def deployed() -> bool:
            d = await s.GetDeployment(sp.DeploymentRef(name=name), metadata=stack.metadata)
            return d.status == sp.DEPLOYMENT_STATUS_DEPLOYED and d.ready_replicas == replicas

        await until(deployed, 300, f"deployment {name}")
        instances = await s.ListInstances(
            sp.ListInstancesRequest(name=name), metadata=stack.metadata
        )
    return [i.address for i in instances.instances if i.status == sp.INSTANCE_STATUS_READY]


async def client_key(stack: Stack, deployment: str, client: str = "bench") -> str:
    """A new client key's secret for ``deployment``."""
    async with grpc.aio.insecure_channel(stack.addresses["shipyard_keys"]) as ch:
        created = await client_keys_pb2_grpc.ClientKeyServiceStub(ch).CreateClientKey(
            client_keys_pb2.CreateClientKeyRequest(deployment=deployment, client=client),
            metadata=stack.metadata,
        )
    return str(created.secret)


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: tuple[int, ...], *, descendants: bool = True) -> float:
    """User + system CPU time of ``pids`` and (unless ``descendants`` is false) all their
    descendants alive now."""
    total = 0.0
    todo = list(pids)
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if descendants:
                todo.extend(int(child) for child in children)
    return total


def runtime_pid(name: str) -> int:
    """The supervising process of the model server serving ``name``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"shipyard_runtime" in argv and name.encode() in argv and b"serve" in argv:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parent_argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
                if b"shipyard_runtime" not in parent_argv:  # the supervisor, not a worker
                    return int(entry.name)
    raise RuntimeError(f"no model server process for {name}")
