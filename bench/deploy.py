"""bench/deploy: deployments through the real scheduler and gateway.

Starts embedded PostgreSQL and NATS, keys, quota, imagebuild, scheduler (local backend)
and gateway as their own processes, builds ``examples/iris``, then measures:

1. **deploy**: ``CreateDeployment`` with 2 replicas until ``deployed`` (pack unpacked,
   model servers started and ready);
2. **gateway overhead**: the same iris prediction sent straight to a model server and
   through the gateway, sequentially (latency p50/p99) and with 8 concurrent clients
   (requests/s); reported as ratios from the same run;
3. **rollout**: an update (a new revision) under 4 concurrent clients until the new
   revision is active: its duration and how many requests failed (target: none);
4. **cold start**: a deployment scaled to zero, then one request: how long it waited.

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
from bench._stack import build_image, deploy, running, tar_folder, until
from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard.scheduler.v1 import scheduler_pb2_grpc

IRIS = Path(__file__).resolve().parent.parent / "examples" / "iris"
RESULTS = Path(__file__).parent / "results" / "deploy.json"
ROW = [[5.1, 3.5, 1.4, 0.2]]


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
    async with running(services) as stack:
        image = await build_image(stack, tar_folder(IRIS))
        results: dict[str, Any] = {"machine": describe(), "image": image}
        gateway = f"http://127.0.0.1:{stack.http_port}"
        async with grpc.aio.insecure_channel(stack.addresses["shipyard_scheduler"]) as ch:
            s = scheduler_pb2_grpc.SchedulerServiceStub(ch)

            async def get(name: str) -> pb.Deployment:
                return await s.GetDeployment(pb.DeploymentRef(name=name), metadata=stack.metadata)

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

                # Cold start from zero.
                await s.ScaleDeployment(
                    pb.ScaleDeploymentRequest(
                        name="iris-bench", scaling=pb.Scaling(min_replicas=0, max_replicas=1)
                    ),
                    metadata=stack.metadata,
                )

                async def asleep() -> bool:
                    d = await get("iris-bench")
                    return d.replicas == 0 and d.ready_replicas == 0

                await until(asleep, 300, "scale to zero")
                start = time.monotonic()
                async with session.post(routed, json=ROW) as resp:
                    await resp.read()
                    status = resp.status
                results["cold_start"] = {
                    "first_request_s": round(time.monotonic() - start, 2),
                    "status": status,
                }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
