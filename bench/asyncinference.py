"""bench/asyncinference: async predictions against sync ones, through the same gateway.

Starts embedded PostgreSQL and NATS, keys, quota, imagebuild, scheduler (local backend),
asyncinference and gateway as their own processes; builds a small model whose
``predict`` returns the time it was called (``time.time()``) and deploys it privately
with one replica and a client key. Then, in one run:

1. **queue overhead**: async requests submitted one at a time at a steady 20/s (no
   backlog); for each, the time from its acceptance (``created_at``, recorded before the
   ``202``) to the start of the model call (the model's own clock), p50 and p99;
2. **sync**: 16 concurrent clients calling the raw route for ``--seconds``: requests/s;
3. **async accepted/s**: 16 concurrent clients submitting with ``X-Async-Request: true``
   for ``--seconds``: ``202`` answers per second;
4. **async completed/s**: those requests from the first submission until the last one
   completed, per second, as a ratio to (2).

Everything shares the machine's 2 cores (the load generator too), so ratios from one run
are what count. Run: ``./dev bench asyncinference`` (``--quick``: 3 s phases).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench._machine import describe
from bench._stack import (
    Stack,
    build_image,
    client_key,
    cpu_seconds,
    deploy,
    running,
    runtime_pid,
    tar_folder,
    until,
)

RESULTS = Path(__file__).parent / "results" / "asyncinference.json"
CLIENTS = 16
MODEL = {
    "serve.py": (
        "import time\n\n\ndef load(model_dir):\n    return None\n\n\n"
        "def predict(model, payload):\n    return {'t': time.time(), 'echo': payload}\n"
    ),
    "shipyard.yaml": 'workers: 1\nexample_input: {"x": 1}\n',
}


def _model_folder(root: Path) -> Path:
    folder = root / "clock"
    folder.mkdir()
    for name, text in MODEL.items():
        (folder / name).write_text(text)
    return folder


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def _deploy(stack: Stack) -> str:
    """Builds and deploys the clock model; returns a client key's secret."""
    image = await build_image(stack, tar_folder(_model_folder(stack.home)), name="clock")
    await deploy(stack, "clock", image)
    return await client_key(stack, "clock")


class _Api:
    def __init__(self, session: aiohttp.ClientSession, base: str, secret: str) -> None:
        self.session = session
        self.base = base
        self.auth = {"Authorization": f"Bearer {secret}"}

    async def sync(self) -> int:
        async with self.session.post(
            f"{self.base}/deployments/clock/predict", json={"x": 1}, headers=self.auth
        ) as resp:
            await resp.read()
            return resp.status

    async def submit(self) -> str:
        async with self.session.post(
            f"{self.base}/deployments/clock/predict",
            json={"x": 1},
            headers={**self.auth, "X-Async-Request": "true"},
        ) as resp:
            body = await resp.json()
            if resp.status != 202:
                raise RuntimeError(f"submit answered {resp.status}: {body}")
            return str(body["request_id"])

    async def status(self, request_id: str) -> dict[str, Any]:
        async with self.session.get(
            f"{self.base}/deployments/clock/async/{request_id}", headers=self.auth
        ) as resp:
            return dict(await resp.json())

    async def result(self, request_id: str) -> dict[str, Any]:
        async with self.session.get(
            f"{self.base}/deployments/clock/async/{request_id}/result", headers=self.auth
        ) as resp:
            return dict(await resp.json())

    async def listed(self, status: str, limit: int = 1000) -> int:
        """How many of the deployment's requests have ``status`` (at most ``limit``)."""
        async with self.session.get(
            f"{self.base}/deployments/clock/async",
            params={"status": status, "limit": str(limit)},
            headers=self.auth,
        ) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"list answered {resp.status}: {body}")
            return len(body["requests"])


async def _completed(api: _Api, request_id: str, deadline: float) -> dict[str, Any]:
    end = time.monotonic() + deadline
    while True:
        status = await api.status(request_id)
        if status["status"] in ("completed", "failed", "cancelled"):
            return status
        if time.monotonic() > end:
            raise RuntimeError(f"{request_id} still {status['status']}")
        await asyncio.sleep(0.02)


async def _overhead(api: _Api, n: int) -> tuple[list[float], list[float]]:
    """Accept → model call start, ms, for ``n`` requests paced at 20/s; and the part of
    it until a worker recorded the attempt (``started_at``)."""
    ids = []
    for _ in range(n):
        ids.append(await api.submit())
        await asyncio.sleep(0.05)
    out, to_start = [], []
    for request_id in ids:
        status = await _completed(api, request_id, 60)
        if status["status"] != "completed":
            raise RuntimeError(f"{request_id}: {status}")
        model_time = (await api.result(request_id))["t"]
        created = _epoch(status["created_at"])
        out.append((model_time - created) * 1000)
        to_start.append((_epoch(status["started_at"]) - created) * 1000)
    return out, to_start


async def _closed_loop(call: Any, seconds: float) -> list[Any]:
    results: list[Any] = []
    end = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < end:
            results.append(await call())

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return results


def _components(stack: Stack) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Each part of the platform: its pids, and whether its descendants count (not the
    scheduler's: its children are the model servers, counted on their own)."""
    parts: dict[str, tuple[tuple[int, ...], bool]] = {
        name.removeprefix("shipyard_"): ((proc.pid,), name != "shipyard_scheduler")
        for name, proc in stack.procs.items()
    }
    parts["postgres"] = ((stack.pg.pid or 0,), True)
    parts["nats"] = ((stack.nats.pid or 0,), True)
    parts["model server"] = ((runtime_pid("clock"),), True)
    return parts


def _cpu(parts: dict[str, tuple[tuple[int, ...], bool]]) -> dict[str, float]:
    return {name: cpu_seconds(pids, descendants=d) for name, (pids, d) in parts.items()}


def _per_request(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """Milliseconds of CPU per request, per part (the load generator not included)."""
    out = {name: round((after[name] - before[name]) / n * 1000, 3) for name in before}
    out["total"] = round(sum(out.values()), 3)
    return out


async def run(quick: bool = False) -> None:
    """Runs the benchmark and writes ``bench/results/asyncinference.json``."""
    seconds = 3.0 if quick else 10.0
    services: dict[str, dict[str, str]] = {
        "shipyard_quota": {},
        "shipyard_imagebuild": {},
        "shipyard_scheduler": {},
        "shipyard_asyncinference": {},
        "shipyard_gateway": {},
    }
    results: dict[str, Any] = {"machine": describe(), "seconds": seconds, "clients": CLIENTS}
    async with running(services) as stack:
        secret = await _deploy(stack)
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            api = _Api(session, f"http://127.0.0.1:{stack.http_port}", secret)
            await _closed_loop(api.sync, 1.0)  # warm up both paths
            await _completed(api, await api.submit(), 60)

            overhead, to_start = await _overhead(api, 50 if quick else 200)
            results["queue_overhead_ms"] = {
                "n": len(overhead),
                "p50": round(statistics.median(overhead), 2),
                "p99": round(_pct(overhead, 0.99), 2),
                # Of it: accepted → a worker took it (commit, queue, fetch); the rest is
                # recording the attempt and the call through the gateway.
                "to_started_p50": round(statistics.median(to_start), 2),
            }

            parts = _components(stack)
            before = _cpu(parts)
            statuses = await _closed_loop(api.sync, seconds)
            ok = sum(1 for s in statuses if s == 200)
            if ok != len(statuses):
                raise RuntimeError(f"sync: {len(statuses) - ok} of {len(statuses)} failed")
            sync_rps = ok / seconds
            sync_cpu = _per_request(before, _cpu(parts), ok)

            before = _cpu(parts)
            first = time.monotonic()
            ids = await _closed_loop(api.submit, seconds)
            accepted_rps = len(ids) / (time.monotonic() - first)
            # Completion: the last one submitted is done, and none is queued or running.
            await _completed(api, ids[-1], 600)

            async def all_done() -> bool:
                return not await api.listed("queued", 1) and not await api.listed("running", 1)

            await until(all_done, 600, "every async request completed")
            completed_rps = len(ids) / (time.monotonic() - first)
            async_cpu = _per_request(before, _cpu(parts), len(ids))
            failed = await api.listed("failed")
    results["sync_rps"] = round(sync_rps, 1)
    results["async_accepted_rps"] = round(accepted_rps, 1)
    results["async_completed_rps"] = round(completed_rps, 1)
    results["async_failed"] = failed
    results["async_completed_over_sync"] = round(completed_rps / sync_rps, 3)
    # Where the difference goes (the status polls of the completion check are in it).
    results["cpu_ms_per_request"] = {"sync": sync_cpu, "async": async_cpu}
    results["targets"] = {
        "queue_overhead_p50_under_10ms": results["queue_overhead_ms"]["p50"] < 10,
        "async_at_least_80pct_of_sync": completed_rps >= 0.8 * sync_rps,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
