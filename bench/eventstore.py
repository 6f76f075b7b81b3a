"""bench/eventstore: the event-sourced command path, end to end, fsync on.

Starts embedded PostgreSQL and NATS (both fsync on every commit/write, as `shipyard up`
runs them), the keys and quota services as their own processes, then measures:

1. commands/s: single-event commands (``SetGroupQuota`` on a new group: load the empty
   stream, decide, append event + outbox row) over gRPC from 16 concurrent clients,
   authenticated like any caller (token checked by keys, cached by quota);
2. append → projection latency (p50/p99): a command at a steady 100/s, then the time until
   the usage projection's row for it is committed (relay → JetStream → runner);
3. replay events/s: the usage projection rebuilt from the store and swapped in.

Run: ``./dev bench eventstore`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import grpc

from bench._machine import describe
from bench._stack import cpu_seconds, running
from shipyard.common.v1 import events_pb2, events_pb2_grpc
from shipyard.quota.v1 import quota_pb2, quota_pb2_grpc
from shipyard_core import db

CLIENTS = 16
RESULTS = Path(__file__).parent / "results" / "eventstore.json"


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) so far of each component; PostgreSQL's includes its
    backends (a process per connection). The bench process started the others, so its
    own children are not counted as its own."""
    return {name: cpu_seconds((pid,), descendants=pid != os.getpid()) for name, pid in pids.items()}


async def _throughput(stub: Any, md: Any, seconds: float) -> dict[str, float]:
    counter = 0
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def client(c: int) -> None:
        nonlocal counter
        i = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await stub.SetGroupQuota(
                quota_pb2.SetGroupQuotaRequest(
                    group=f"b{c}-{i}", limits=quota_pb2.Resources(cpu=4, memory_gib=8)
                ),
                metadata=md,
            )
            latencies.append(time.perf_counter() - t0)
            counter += 1
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    elapsed = time.perf_counter() - started
    return {
        "commands": counter,
        "seconds": round(elapsed, 2),
        "commands_per_second": round(counter / elapsed, 1),
        "command_latency_p50_ms": round(_pct(latencies, 50) * 1000, 2),
        "command_latency_p99_ms": round(_pct(latencies, 99) * 1000, 2),
    }


async def _projection_latency(stub: Any, md: Any, dsn: str, count: int) -> dict[str, float]:
    pool = await db.create_pool(dsn, max_size=40)
    latencies: list[float] = []

    async def one(i: int) -> None:
        group = f"lat-{i}"
        await stub.SetGroupQuota(
            quota_pb2.SetGroupQuotaRequest(group=group, limits=quota_pb2.Resources(cpu=1)),
            metadata=md,
        )
        appended = time.perf_counter()
        while not await pool.fetchval(
            "SELECT 1 FROM quota.projection_positions WHERE projection = 'usage' "
            "AND stream_id = $1",
            f"group:{group}",
        ):
            await asyncio.sleep(0.0005)  # poll resolution: 0.5 ms
        latencies.append(time.perf_counter() - appended)

    tasks = []
    for i in range(count):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.01)  # a steady 100 commands/s
    await asyncio.gather(*tasks)
    await pool.close()
    return {
        "samples": len(latencies),
        "append_to_projection_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "append_to_projection_p99_ms": round(_pct(latencies, 99) * 1000, 2),
    }


async def _replay(address: str, md: Any) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as ch:
        admin = events_pb2_grpc.EventAdminStub(ch)
        r = await admin.ReplayProjection(
            events_pb2.ReplayProjectionRequest(projection="usage"), metadata=md, timeout=600
        )
    return {
        "replayed_events": r.events,
        "replay_seconds": round(r.seconds, 2),
        "replay_events_per_second": round(r.events_per_second, 1),
        "replay_equal_to_live": r.equal,
    }


async def run(quick: bool = False) -> dict[str, Any]:
    """Runs the three measurements and writes bench/results/eventstore.json."""
    quota_env = {
        # commands/s measures the command path, not read-your-writes
        "SHIPYARD_PROJECTION_WAIT_SECONDS": "0",
    }
    async with running({"shipyard_quota": quota_env}) as stack:
        md = stack.metadata
        quota_addr = stack.addresses["shipyard_quota"]
        results: dict[str, Any] = {"machine": describe(), "clients": CLIENTS}
        async with grpc.aio.insecure_channel(quota_addr) as ch:
            stub = quota_pb2_grpc.QuotaServiceStub(ch)
            await _throughput(stub, md, 2)  # warm-up
            pids = {
                "bench client": os.getpid(),
                "keys": stack.procs["shipyard_keys"].pid,
                "quota (gRPC + handler + relay + projection)": stack.procs["shipyard_quota"].pid,
                "postgres": stack.pg.pid or 0,
                "nats": stack.nats.pid or 0,
            }
            before = _cpu_seconds(pids)
            tp = await _throughput(stub, md, 5 if quick else 20)
            after = _cpu_seconds(pids)
            results.update(tp)
            results["cpu_us_per_command"] = {
                k: round((after[k] - before[k]) / tp["commands"] * 1e6)
                for k in before
                if k in after
            }
            samples = 100 if quick else 1000
            results.update(await _projection_latency(stub, md, stack.pg.url, samples))
        results.update(await _replay(quota_addr, md))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results
