"""bench/deploy: deployments through the real scheduler and gateway.

Starts embedded PostgreSQL and NATS, keys, quota, imagebuild, scheduler (local backend)
and gateway as their own processes, builds ``examples/iris``, then measures:

1. **create → first prediction** (issue 4's target, < 3 s) for an already-built image:
   ``CreateDeployment`` (1 replica) until the first 200 through the gateway, polling
   every 10 ms; the image was built earlier, so the scheduler prefetched it (unpacked and
   compiled, as it does for every new image). Repeated ``TRIALS`` times (a new
   deployment each), the median reported. Also the same **right after a build**, with
   the prefetch still running: what a user who deploys at once sees;
2. **create → deployed** with 2 replicas (both model servers started and ready);
3. **gateway overhead**: the same iris prediction sent straight to a model server and
   through the gateway, sequentially (latency p50/p99) and with 8 concurrent clients
   (requests/s); reported as ratios from the same run;
4. **rollout**: an update (a new revision) under 4 concurrent clients until the new
   revision is active: its duration and how many requests failed (target: none);
5. **scale-from-zero activation** (target < 2 s): a deployment scaled to zero, then one
   request: how long it waited for its 200; ``TRIALS`` times, the median reported.

Run: ``./dev bench deploy`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench._machine import describe
from bench._stack import build_image, create_deployment, deploy, running, tar_folder, until
from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard.scheduler.v1 import scheduler_pb2_grpc

IRIS = Path(__file__).resolve().parent.parent / "examples" / "iris"
RESULTS = Path(__file__).parent / "results" / "deploy.json"
ROW = [[5.1, 3.5, 1.4, 0.2]]
TRIALS = 5


async def _first_prediction(session: aiohttp.ClientSession, url: str, started: float) -> float:
    """Seconds from ``started`` until ``url`` first answers 200 (polled every 10 ms: the
    gateway answers 404 until it knows the deployment, then holds the request until an
    instance is ready)."""
    while True:
        async with session.post(url, json=ROW) as resp:
            await resp.read()
            if resp.status == 200:
                return time.monotonic() - started
        if time.monotonic() - started > 300:
            raise RuntimeError(f"{url}: no 200 within 300 s (last {resp.status})")
        await asyncio.sleep(0.01)


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(values), 3),
        "min_s": round(min(values), 3),
        "max_s": round(max(values), 3),
        "trials_s": [round(v, 3) for v in values],
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latencies(session: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        async with session.post(url, json=ROW) as resp:
            await resp.read()
            assert resp.status == 200, resp.status
        out.append((time.perf_counter() - start) * 1000)
    return out


async def _throughput(
    session: aiohttp.ClientSession, url: str, clients: int, seconds: float
) -> float:
    count = 0
    end = time.monotonic() + seconds

    async def client() -> None:
        nonlocal count
        while time.monotonic() < end:
            async with session.post(url, json=ROW) as resp:
                await resp.read()
                count += resp.status == 200

    await asyncio.gather(*(client() for _ in range(clients)))
    return count / seconds


async def run(quick: bool = False) -> None:
    """Runs the benchmark and writes ``bench/results/deploy.json``."""
    services: dict[str, dict[str, str]] = {
        "shipyard_quota": {},
        "shipyard_imagebuild": {},
        "shipyard_scheduler": {"SHIPYARD_SCALE_TO_ZERO_AFTER_SECONDS": "3"},
        "shipyard_gateway": {},
    }
    n = 200 if quick else 2000
    seconds = 3.0 if quick else 10.0
    trials = 2 if quick else TRIALS
    async with running(services) as stack:
        image = await build_image(stack, tar_folder(IRIS))
        results: dict[str, Any] = {"machine": describe(), "image": image}
        gateway = f"http://127.0.0.1:{stack.http_port}"
        images = stack.home / "runtime" / "images"

        async def prefetched() -> bool:
            return any(images.glob("*/.shipyard-compiled"))

        started = time.monotonic()
        await until(prefetched, 300, "the scheduler's prefetch of the image")
        results["prefetch_after_build_s"] = round(time.monotonic() - started, 2)
        async with (
            grpc.aio.insecure_channel(stack.addresses["shipyard_scheduler"]) as ch,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as probe,
        ):
            s = scheduler_pb2_grpc.SchedulerServiceStub(ch)

            async def get(name: str) -> pb.Deployment:
                return await s.GetDeployment(pb.DeploymentRef(name=name), metadata=stack.metadata)

            async def create_to_first_prediction(name: str, image: str) -> float:
                started = time.monotonic()
                await create_deployment(s, stack, name, image, private=False)
                took = await _first_prediction(
                    probe, f"{gateway}/deployments/{name}/predict", started
                )
                await s.DeleteDeployment(pb.DeploymentRef(name=name), metadata=stack.metadata)
                return took

            first = [await create_to_first_prediction(f"iris-t{i}", image) for i in range(trials)]
            results["create_to_first_prediction"] = _summary(first)

            # Deployed at once after its build: the prefetch is still running.
            fresh = await build_image(
                stack, tar_folder(IRIS, {"README.md": b"# iris, rebuilt\n"}), "iris-fresh"
            )
            results["create_to_first_prediction_right_after_build_s"] = round(
                await create_to_first_prediction("iris-fresh", fresh), 3
            )

            start = time.monotonic()
            ready = await deploy(stack, "iris-bench", image, replicas=2, private=False)
            results["deploy_2_replicas_s"] = round(time.monotonic() - start, 2)
            direct = f"http://{ready[0]}/predict"
            routed = f"{gateway}/deployments/iris-bench/predict"
            connector = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(connector=connector) as session:
                await _latencies(session, direct, 50)  # warm up both paths
                await _latencies(session, routed, 50)
                lat_direct = await _latencies(session, direct, n)
                lat_routed = await _latencies(session, routed, n)
                results["latency_ms"] = {
                    "direct_p50": round(statistics.median(lat_direct), 3),
                    "direct_p99": round(_pct(lat_direct, 0.99), 3),
                    "gateway_p50": round(statistics.median(lat_routed), 3),
                    "gateway_p99": round(_pct(lat_routed, 0.99), 3),
                    "gateway_added_p50": round(
                        statistics.median(lat_routed) - statistics.median(lat_direct), 3
                    ),
                }
                # Both instances behind the gateway vs one instance direct: per-instance
                # comparison is what the ratio below normalises.
                rps_direct = await _throughput(session, direct, 8, seconds)
                rps_routed = await _throughput(session, routed, 8, seconds)
                results["throughput_rps_8_clients"] = {
                    "direct_one_instance": round(rps_direct, 1),
                    "gateway_two_instances": round(rps_routed, 1),
                    "ratio_gateway_to_direct": round(rps_routed / rps_direct, 3),
                }

                # Rollout under load.
                failures = 0
                ok = 0
                stop = asyncio.Event()

                async def client() -> None:
                    nonlocal failures, ok
                    while not stop.is_set():
                        async with session.post(routed, json=ROW) as resp:
                            await resp.read()
                            if resp.status == 200:
                                ok += 1
                            else:
                                failures += 1

                clients = [asyncio.create_task(client()) for _ in range(4)]
                start = time.monotonic()
                await s.UpdateDeployment(
                    pb.UpdateDeploymentRequest(
                        name="iris-bench", description="bench rollout", message="bench"
                    ),
                    metadata=stack.metadata,
                )

                async def rolled() -> bool:
                    d = await get("iris-bench")
                    return d.active_revision == 2 and d.status == pb.DEPLOYMENT_STATUS_DEPLOYED

                await until(rolled, 300, "rollout")
                results["rollout"] = {"seconds": round(time.monotonic() - start, 2)}
                await asyncio.sleep(3)  # keep the load on while the old revision drains
                stop.set()
                await asyncio.gather(*clients)
                results["rollout"].update({"requests_ok": ok, "requests_failed": failures})

                # Scale-from-zero activation.
                await s.ScaleDeployment(
                    pb.ScaleDeploymentRequest(
                        name="iris-bench", scaling=pb.Scaling(min_replicas=0, max_replicas=1)
                    ),
                    metadata=stack.metadata,
                )

                async def asleep() -> bool:
                    d = await get("iris-bench")
                    return d.replicas == 0 and d.ready_replicas == 0

                cold = []
                for _ in range(trials):
                    await until(asleep, 300, "scale to zero")
                    start = time.monotonic()
                    async with session.post(routed, json=ROW) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"activation answered {resp.status}")
                    cold.append(time.monotonic() - start)
                results["scale_from_zero_activation"] = _summary(cold)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
