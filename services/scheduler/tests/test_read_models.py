"""The scheduler's read models: list search and filters, the last 200 instances, replay."""

from __future__ import annotations

import grpc
import pytest

from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard_core import db
from shipyard_core.aggregate import Repository
from shipyard_core.eventstore import EventStore, NewEvent, ensure_schema
from shipyard_core.projections.base import execute_statements
from shipyard_core.projections.consistency import wait_until_projected
from shipyard_core.projections.replay import replay_projection
from shipyard_scheduler.domain import (
    SCHEDULER_EVENTS,
    SCHEDULER_UPCASTERS,
    Deployment,
    Instance,
)
from shipyard_scheduler.projections import SCHEMA, DeploymentsProjection

from .conftest import Stack, md


async def _create(stub: object, name: str, image: str, token: str = "ana", group: str = "") -> None:
    await stub.CreateDeployment(  # type: ignore[attr-defined]
        pb.CreateDeploymentRequest(
            name=name,
            group=group,
            spec=pb.DeploymentSpec(image=image, instance_type="cpu.small"),
        ),
        metadata=md(token),
    )


async def test_list_searches_and_filters(stack: Stack) -> None:
    v1 = stack.images["v1"]
    async with stack.channel() as ch:
        stub = stack.stub(ch)
        await _create(stub, "list-alpha", v1)
        await _create(stub, "list-beta", v1)
        await _create(stub, "other-gamma", v1, token="admin", group="team-a")
        await stub.StopDeployment(pb.DeploymentRef(name="list-beta"), metadata=md("ana"))

        async def names(token: str = "ana", **kw: object) -> list[str]:
            got = await stub.ListDeployments(pb.ListDeploymentsRequest(**kw), metadata=md(token))  # type: ignore[arg-type]
            return sorted(d.name for d in got.deployments)

        assert await names() == ["list-alpha", "list-beta", "other-gamma"]
        assert await names(search="LIST-") == ["list-alpha", "list-beta"]
        assert await names(search="%") == []  # a wildcard is a character, not a pattern
        assert await names(status=pb.DEPLOYMENT_STATUS_STOPPED) == ["list-beta"]
        assert await names(mine=True) == ["list-alpha", "list-beta"]
        assert await names(group="team-a", mine=True, token="admin") == ["other-gamma"]
        assert await names(token="bob") == []
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            await names(token="bob", group="team-a")
        assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # The name is global: another group cannot take it, and is not told whose it is.
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            await _create(stub, "list-alpha", v1, token="bob")
        assert taken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "team-a" not in (taken.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as exists:
            await _create(stub, "list-alpha", v1)
        assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS

        for name in ("list-alpha", "list-beta", "other-gamma"):
            await stub.DeleteDeployment(pb.DeploymentRef(name=name), metadata=md("admin"))
        assert await names() == []
        assert await names(include_deleted=True) == ["list-alpha", "list-beta", "other-gamma"]


async def test_only_the_last_200_instances_are_kept(stack: Stack) -> None:
    async with stack.channel() as ch:
        stub = stack.stub(ch)
        await _create(stub, "many", stack.images["v1"])
        await stub.StopDeployment(pb.DeploymentRef(name="many"), metadata=md("ana"))
        # 205 instances as a long-lived deployment accumulates them over restarts.
        repo = Repository(stack.scheduler.commands.store, Instance, SCHEDULER_EVENTS)
        saved = []
        for i in range(205):
            inst = Instance(f"many-r1-old{i:03d}")
            inst.created("many", 1, "local")
            saved += await repo.save(inst)
        pool = stack.scheduler.commands.pool
        assert await wait_until_projected(pool, SCHEMA, DeploymentsProjection.name, saved, 30)
        got = await stub.ListInstances(pb.ListInstancesRequest(name="many"), metadata=md("ana"))
        ids = [i.instance_id for i in got.instances]
        assert len(ids) == 200 and "many-r1-old204" in ids and "many-r1-old004" not in ids
        kept = await pool.fetchval(
            "SELECT count(*) FROM scheduler.instances WHERE deployment = 'many'"
        )
        assert kept == 200
        limited = await stub.ListInstances(
            pb.ListInstancesRequest(name="many", limit=5), metadata=md("ana")
        )
        assert len(limited.instances) == 5
        await stub.DeleteDeployment(pb.DeploymentRef(name="many"), metadata=md("ana"))


async def test_replay_rebuilds_the_same_read_model(stack: Stack) -> None:
    # Whatever the module's other tests left in the event store (this runs last).
    result = await replay_projection(
        DeploymentsProjection(), stack.scheduler.commands.pool, swap=False
    )
    assert result.equal, result.differences[:5]
    assert result.events > 0


# A spec as version 1 of DeploymentCreated/DeploymentUpdated wrote it (before OCI images).
SPEC_V1 = {
    "image_name": "iris",
    "image_version": 1,
    "image_digest": "ab" * 32,
    "pack_key": "packs/sha256/" + "ab" * 32,
    "workers": 1,
    "python": "3.11.7",
    "instance_type": "cpu.small",
    "cpu": 0.5,
    "memory_gib": 0.5,
    "gpu": 0,
    "min_replicas": 1,
    "max_replicas": 1,
    "target_inflight": 4,
    "access": "private",
    "description": "",
    "metadata": {},
}


async def test_version_1_deployment_events_read_as_packs(database_url: str) -> None:
    """Deployment events stored before specs had ``image_kind`` and ``image_ref`` are
    upcast on read (aggregate and projection), read-model rows the projection wrote from
    them get the same fields at start, and a replay then equals the live tables."""
    conn = await db.connect(database_url)
    try:
        await ensure_schema(conn, SCHEMA)
        await DeploymentsProjection.create_tables(conn)
    finally:
        await conn.close()
    pool = await db.create_pool(database_url, max_size=2)
    try:
        store = EventStore(pool, SCHEMA, SCHEDULER_UPCASTERS)
        v1 = [
            NewEvent(
                "deployment",
                "legacy",
                "DeploymentCreated",
                1,
                {
                    "group": "team-a",
                    "revision": 1,
                    "spec": SPEC_V1,
                    "replicas": 1,
                    "readme": "",
                    "created_by": "ana",
                },
                {"actor": "ana"},
            ),
            NewEvent(
                "deployment",
                "legacy",
                "DeploymentUpdated",
                1,
                {
                    "revision": 2,
                    "spec": {**SPEC_V1, "description": "v2"},
                    "replicas": 1,
                    "message": "",
                    "changed": ["description"],
                },
                {"actor": "ana"},
            ),
        ]
        stored = await store.append(v1, 0)

        # The aggregate: version 2 shapes, packs.
        deployment = await Repository(store, Deployment, SCHEDULER_EVENTS).load("legacy")
        assert deployment.revision == 2
        for spec in deployment.specs.values():
            assert (spec.image_kind, spec.image_ref) == ("pack", "")
        read = await store.read_stream("deployment:legacy")
        assert [e.schema_version for e in read] == [2, 2]
        raw = await pool.fetch(f"SELECT schema_version, payload FROM {SCHEMA}.events")
        assert [r["schema_version"] for r in raw] == [1, 1]  # never rewritten
        assert all("image_kind" not in r["payload"]["spec"] for r in raw)

        # The live tables as the projection wrote them before version 2 (no upcaster).
        tables = DeploymentsProjection.live_tables()
        async with pool.acquire() as c:
            for event in stored:
                await execute_statements(c, DeploymentsProjection().handle(event), tables)
            await c.executemany(
                f"INSERT INTO {SCHEMA}.projection_positions (projection, stream_id, version) "
                "VALUES ($1, $2, $3) ON CONFLICT (projection, stream_id) "
                "DO UPDATE SET version = excluded.version",
                [(DeploymentsProjection.name, e.stream_id, e.version) for e in stored],
            )
            old = await c.fetchval(f"SELECT spec FROM {tables['deployments']}")
            assert "image_kind" not in old
            # What a start of the upgraded scheduler does.
            await DeploymentsProjection.create_tables(c)
            await DeploymentsProjection.create_tables(c)  # idempotent
            for table in ("deployments", "revisions", "history"):
                specs = await c.fetch(f"SELECT spec FROM {tables[table]}")
                assert specs and all(
                    (r["spec"]["image_kind"], r["spec"]["image_ref"]) == ("pack", "") for r in specs
                ), table
        result = await replay_projection(DeploymentsProjection(), pool, swap=False)
        assert result.equal, result.differences[:5]
        assert result.events == 2
    finally:
        await pool.close()
