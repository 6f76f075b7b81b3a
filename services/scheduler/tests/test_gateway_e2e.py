"""The scheduler with the gateway in front: zero-downtime updates, scale to zero with
activation, autoscaling, private access. Real processes all the way down."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard_core.auth import InternalTokenAuthenticator
from shipyard_gateway.main import GatewayHost, build
from shipyard_gateway.settings import GatewaySettings
from shipyard_testing import StaticAuthenticator, wait_for

from .conftest import INTERNAL, TOKENS, Stack, md

DEPLOYED = pb.DEPLOYMENT_STATUS_DEPLOYED


@pytest.fixture(scope="module")
async def gateway(stack: Stack) -> AsyncIterator[GatewayHost]:
    settings = GatewaySettings(
        nats_url=stack.nats_url,
        grpc_port=0,
        http_port=0,
        scheduler_addr=stack.address,
        internal_token=INTERNAL,
        load_report_interval_seconds=0.2,
        activation_timeout_seconds=60,
        data_dir=stack.settings.data_dir,
    )
    host = await build(settings, InternalTokenAuthenticator(StaticAuthenticator(TOKENS), INTERNAL))
    async with host:
        await host.routes.wait_synced()
        yield host


async def _create(
    stack: Stack, name: str, image: str, scaling: pb.Scaling, public: bool = True
) -> None:
    async with stack.channel() as ch:
        await stack.stub(ch).CreateDeployment(
            pb.CreateDeploymentRequest(
                name=name,
                spec=pb.DeploymentSpec(
                    image=image,
                    instance_type="cpu.small",
                    scaling=scaling,
                    access=pb.ACCESS_PUBLIC if public else pb.ACCESS_PRIVATE,
                ),
            ),
            metadata=md("ana"),
        )


async def _get(stack: Stack, name: str) -> pb.Deployment:
    async with stack.channel() as ch:
        return await stack.stub(ch).GetDeployment(pb.DeploymentRef(name=name), metadata=md("ana"))


async def _until(
    stack: Stack,
    name: str,
    check: Callable[[pb.Deployment], bool],
    deadline: float = 60,
    what: str = "",
) -> pb.Deployment:
    async def probe() -> pb.Deployment | None:
        d = await _get(stack, name)
        return d if check(d) else None

    return await wait_for(
        probe, timeout=deadline, interval=0.1, message=what or f"{name} never got there"
    )


async def _delete(stack: Stack, name: str) -> None:
    async with stack.channel() as ch:
        await stack.stub(ch).DeleteDeployment(pb.DeploymentRef(name=name), metadata=md("ana"))


async def test_update_rolls_out_with_no_failed_request(stack: Stack, gateway: GatewayHost) -> None:
    await _create(stack, "roll", stack.images["v1"], pb.Scaling(min_replicas=2, max_replicas=2))
    await _until(stack, "roll", lambda d: d.status == DEPLOYED and d.ready_replicas == 2)
    url = f"{gateway.http_url}/deployments/roll/predict"
    seen: Counter[str] = Counter()
    failures: list[str] = []
    done = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with session.post(url, json=[1]) as resp:
                body = await resp.json()
                if resp.status != 200:
                    failures.append(f"{resp.status} {body}")
                else:
                    seen[body["version"]] += 1

    async with aiohttp.ClientSession() as session:
        clients = [asyncio.create_task(client(session)) for _ in range(4)]
        await wait_for(lambda: seen["v1"] > 20, timeout=30, message="no traffic before the update")
        async with stack.channel() as ch:
            await stack.stub(ch).UpdateDeployment(
                pb.UpdateDeploymentRequest(name="roll", image=stack.images["v2"], message="v2"),
                metadata=md("ana"),
            )
        await _until(stack, "roll", lambda d: d.status == DEPLOYED and d.active_revision == 2, 90)
        await wait_for(lambda: seen["v2"] > 20, timeout=30, message="no traffic reached v2")

        async def old_gone() -> bool:
            async with stack.channel() as ch:
                got = await stack.stub(ch).ListInstances(
                    pb.ListInstancesRequest(name="roll"), metadata=md("ana")
                )
            old = [i for i in got.instances if i.revision == 1]
            return len(old) == 2 and all(i.status == pb.INSTANCE_STATUS_TERMINATED for i in old)

        await wait_for(old_gone, timeout=30, message="revision 1 kept running")
        count_after = sum(seen.values())
        await wait_for(
            lambda: sum(seen.values()) > count_after + 20, timeout=30, message="traffic stopped"
        )
        done.set()
        await asyncio.gather(*clients)
    assert failures == [], failures[:5]
    assert seen["v1"] > 0 and seen["v2"] > 0
    await _delete(stack, "roll")


async def test_scale_to_zero_then_a_request_wakes_it(stack: Stack, gateway: GatewayHost) -> None:
    await _create(stack, "sleepy", stack.images["v1"], pb.Scaling(min_replicas=0, max_replicas=2))
    await _until(stack, "sleepy", lambda d: d.status == DEPLOYED and d.ready_replicas == 1)
    # No traffic: after scale_to_zero_after (2 s in this stack) it sleeps.
    asleep = await _until(stack, "sleepy", lambda d: d.replicas == 0 and d.ready_replicas == 0, 60)
    assert asleep.status == DEPLOYED
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.http_url}/deployments/sleepy/predict", json={"x": 1}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert (await resp.json()) == {"version": "v1", "echo": {"x": 1}}
    awake = await _get(stack, "sleepy")
    assert awake.replicas == 1
    events = stack.scheduler.commands.store
    stored = await events.read_stream("deployment:sleepy")
    scaled = [e.payload for e in stored if e.event_type == "DeploymentAutoscaled"]
    # Asleep, then woken: by the gateway's Activate or by its load report, whichever
    # reached the scheduler first.
    assert scaled[-2]["replicas"] == 0 and "scaled to zero" in scaled[-2]["reason"]
    assert scaled[-1]["replicas"] == 1
    await _delete(stack, "sleepy")


async def test_autoscaler_follows_in_flight_requests(stack: Stack, gateway: GatewayHost) -> None:
    await _create(
        stack,
        "busy",
        stack.images["v1"],
        pb.Scaling(min_replicas=1, max_replicas=3, target_inflight=1),
    )
    await _until(stack, "busy", lambda d: d.status == DEPLOYED and d.ready_replicas == 1)
    url = f"{gateway.http_url}/deployments/busy/predict"
    done = asyncio.Event()
    statuses: Counter[int] = Counter()

    async def client(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with session.post(url, json={"sleep": 0.3}) as resp:
                statuses[resp.status] += 1

    async with aiohttp.ClientSession() as session:
        clients = [asyncio.create_task(client(session)) for _ in range(4)]
        await _until(
            stack,
            "busy",
            lambda d: d.replicas == 3 and d.ready_replicas == 3,
            60,
            "never scaled up",
        )
        done.set()
        await asyncio.gather(*clients)
    assert set(statuses) == {200}, statuses
    # Idle again: back to the minimum after the scale-down delay (1 s in this stack).
    await _until(stack, "busy", lambda d: d.replicas == 1, 60, "never scaled down")
    await _delete(stack, "busy")


async def test_private_deployment_needs_a_member(stack: Stack, gateway: GatewayHost) -> None:
    await _create(
        stack,
        "secret",
        stack.images["v1"],
        pb.Scaling(min_replicas=1, max_replicas=1),
        public=False,
    )
    await _until(stack, "secret", lambda d: d.status == DEPLOYED)
    url = f"{gateway.http_url}/deployments/secret/predict"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=[1]) as anonymous:
            assert anonymous.status == 401
        async with session.post(url, json=[1], headers={"Authorization": "Bearer bob"}) as other:
            assert other.status == 403
        async with session.post(url, json=[1], headers={"Authorization": "Bearer ana"}) as member:
            assert member.status == 200 and (await member.json())["version"] == "v1"
        async with session.post(
            f"{gateway.http_url}/deployments/nope/predict", json=[1]
        ) as unknown:
            assert unknown.status == 404
            assert "does not exist" in (await unknown.json())["error"]
    await _delete(stack, "secret")
