"""QuotaService over real gRPC, with real PostgreSQL and NATS behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from shipyard.common.v1 import events_pb2, events_pb2_grpc
from shipyard.quota.v1 import quota_pb2, quota_pb2_grpc
from shipyard_core.auth import Principal
from shipyard_core.grpckit.server import ServiceHost
from shipyard_quota.main import build
from shipyard_quota.settings import QuotaSettings
from shipyard_testing import StaticAuthenticator, wait_for

TOKENS = {
    "admin-token": Principal("root", True, frozenset()),
    "ana-token": Principal("ana", False, frozenset({"team-a"})),
    "bob-token": Principal("bob", False, frozenset({"team-b"})),
}


@pytest.fixture
async def host(database_url: str, nats_url: str) -> AsyncIterator[ServiceHost]:
    settings = QuotaSettings(database_url=database_url, nats_url=nats_url, grpc_port=0)
    h = await build(settings, StaticAuthenticator(TOKENS))
    async with h:
        yield h


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_quota_over_grpc(host: ServiceHost) -> None:
    async with grpc.aio.insecure_channel(host.address) as ch:
        stub = quota_pb2_grpc.QuotaServiceStub(ch)
        await stub.SetInstanceType(
            quota_pb2.SetInstanceTypeRequest(
                instance_type=quota_pb2.InstanceType(name="cpu.small", cpu=1, memory_gib=2)
            ),
            metadata=_md("admin-token"),
        )
        usage = await stub.SetGroupQuota(
            quota_pb2.SetGroupQuotaRequest(
                group="team-a", limits=quota_pb2.Resources(cpu=2.5, memory_gib=8, instances=4)
            ),
            metadata=_md("admin-token"),
        )
        assert usage.limits.cpu == 2.5 and usage.free.cpu == 2.5
        r = await stub.Reserve(
            quota_pb2.ReserveRequest(
                group="team-a",
                reservation_id="iris:1",
                deployment="iris",
                instance_type="cpu.small",
                instances=2,
            ),
            metadata=_md("ana-token"),
        )
        assert r.resources.cpu == 2 and r.resources.memory_gib == 4
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Reserve(
                quota_pb2.ReserveRequest(
                    group="team-a",
                    reservation_id="big:1",
                    deployment="big",
                    instance_type="cpu.small",
                    instances=1,
                ),
                metadata=_md("ana-token"),
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "group team-a needs 1 CPU, 0.5 CPU free" in (refused.value.details() or "")

        # the usage projection catches up through the relay and JetStream
        async def used() -> bool:
            u = await stub.GetGroupUsage(
                quota_pb2.GetGroupUsageRequest(group="team-a"), metadata=_md("ana-token")
            )
            return u.used.cpu == 2 and len(u.reservations) == 1

        await wait_for(used, timeout=20, message="usage projection did not catch up")

        # a member of another group sees nothing of team-a
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.GetGroupUsage(
                quota_pb2.GetGroupUsageRequest(group="team-a"), metadata=_md("bob-token")
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        listed = await stub.ListGroupUsage(
            quota_pb2.ListGroupUsageRequest(), metadata=_md("bob-token")
        )
        assert [g.group for g in listed.groups] == []

        # no token, bad token, bad input
        for md in ((), _md("nope")):
            with pytest.raises(grpc.aio.AioRpcError) as unauth:
                await stub.ListInstanceTypes(quota_pb2.ListInstanceTypesRequest(), metadata=md)
            assert unauth.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.SetGroupQuota(
                quota_pb2.SetGroupQuotaRequest(group="team-a", limits=quota_pb2.Resources(cpu=-1)),
                metadata=_md("admin-token"),
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limits.cpu" in (bad.value.details() or "")


async def test_event_admin_lists_events_and_replays(host: ServiceHost) -> None:
    async with grpc.aio.insecure_channel(host.address) as ch:
        quota = quota_pb2_grpc.QuotaServiceStub(ch)
        admin = events_pb2_grpc.EventAdminStub(ch)
        await quota.SetGroupQuota(
            quota_pb2.SetGroupQuotaRequest(group="g1", limits=quota_pb2.Resources(cpu=1)),
            metadata=_md("admin-token"),
        )
        listed = await admin.ListEvents(events_pb2.ListEventsRequest(), metadata=_md("admin-token"))
        assert [e.event_type for e in listed.events] == ["GroupQuotaSet"]
        assert listed.events[0].stream_id == "group:g1"
        assert '"actor": "root"' in listed.events[0].metadata_json
        replay = await admin.ReplayProjection(
            events_pb2.ReplayProjectionRequest(projection="usage"), metadata=_md("admin-token")
        )
        assert replay.swapped and replay.events == 1 and replay.equal
        lag = await admin.GetLag(events_pb2.GetLagRequest(), metadata=_md("admin-token"))
        assert {c.name for c in lag.consumers} >= {"outbox-relay", "usage"}
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await admin.ListEvents(events_pb2.ListEventsRequest(), metadata=_md("ana-token"))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
