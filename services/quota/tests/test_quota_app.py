"""Quota's handlers on a real PostgreSQL: limits, reservations, refusals, permissions."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipyard_core import db
from shipyard_core.auth import Principal
from shipyard_core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from shipyard_core.eventstore import EventStore, ensure_schema
from shipyard_core.projections import replay_projection
from shipyard_quota.app import QuotaApp
from shipyard_quota.domain.amount import Amount
from shipyard_quota.projections import UsageProjection

ADMIN = Principal(user="root", admin=True, groups=frozenset())
ANA = Principal(user="ana", admin=False, groups=frozenset({"team-a"}))
BOB = Principal(user="bob", admin=False, groups=frozenset({"team-b"}))


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(database_url, max_size=30)
    async with p.acquire() as conn:
        await ensure_schema(conn, "quota")
        await UsageProjection.create_tables(conn)
    yield p
    await p.close()


class InlineProjection:
    """Applies the usage projection straight from the store (no broker) for app tests."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def sync(self) -> None:
        await replay_projection(UsageProjection(), self.pool)


@pytest.fixture
async def app(pool: asyncpg.Pool) -> QuotaApp:
    quota = QuotaApp(EventStore(pool, "quota"), pool, projection_wait=0)
    await quota.set_instance_type(ADMIN, "cpu.small", cpu=0.5, memory_gib=1, gpu=0)
    await quota.set_instance_type(ADMIN, "gpu.large", cpu=4, memory_gib=16, gpu=1)
    return quota


async def test_reserve_within_quota_and_refuse_beyond_with_a_clear_message(
    app: QuotaApp, pool: asyncpg.Pool
) -> None:
    await app.set_group_quota(
        ADMIN, "team-a", Amount.from_units(cpu=2, memory_gib=8, gpu=0, instances=10)
    )
    r = await app.reserve(ANA, "team-a", "dep-1:r1", "dep-1", "cpu.small", 3)
    assert r.amount == Amount(1500, 3072, 0, 3)
    # the same request again is a no-op (idempotent by reservation id)
    again = await app.reserve(ANA, "team-a", "dep-1:r1", "dep-1", "cpu.small", 3)
    assert again.amount == r.amount
    with pytest.raises(ResourceExhausted) as refused:
        await app.reserve(ANA, "team-a", "dep-2:r1", "dep-2", "cpu.small", 2)
    assert "group team-a needs 1 CPU, 0.5 CPU free" in refused.value.message
    with pytest.raises(
        ResourceExhausted,
        match=r"needs 4 CPU, 16 GiB memory, 1 GPU; 0\.5 CPU, 5 GiB memory, 0 GPU free",
    ):
        await app.reserve(ANA, "team-a", "dep-3:r1", "dep-3", "gpu.large", 1)
    # resizing the existing reservation checks only its growth
    await app.reserve(ANA, "team-a", "dep-1:r1", "dep-1", "cpu.small", 4)
    with pytest.raises(ResourceExhausted):
        await app.reserve(ANA, "team-a", "dep-1:r1", "dep-1", "cpu.small", 5)
    assert await app.release(ANA, "team-a", "dep-1:r1") is True
    assert await app.release(ANA, "team-a", "dep-1:r1") is False  # idempotent
    await app.reserve(ANA, "team-a", "dep-2:r1", "dep-2", "cpu.small", 4)


async def test_refusals_name_the_field_and_the_fix(app: QuotaApp) -> None:
    with pytest.raises(FailedPrecondition, match=r"has no quota yet.*shipyard quota set team-a"):
        await app.reserve(ANA, "team-a", "x", "dep", "cpu.small", 1)
    await app.set_group_quota(
        ADMIN, "team-a", Amount.from_units(cpu=2, memory_gib=8, gpu=0, instances=10)
    )
    with pytest.raises(NotFound, match=r"instance type cpu\.huge does not exist"):
        await app.reserve(ANA, "team-a", "x", "dep", "cpu.huge", 1)
    with pytest.raises(InvalidArgument, match="instances: must be at least 1"):
        await app.reserve(ANA, "team-a", "x", "dep", "cpu.small", 0)
    with pytest.raises(InvalidArgument, match="group: 'Team A' is not a valid name"):
        await app.set_group_quota(ADMIN, "Team A", Amount())
    with pytest.raises(InvalidArgument, match="cpu: must be a number >= 0"):
        Amount.from_units(cpu=-1, memory_gib=1, gpu=0, instances=1)


async def test_permissions(app: QuotaApp) -> None:
    with pytest.raises(PermissionDenied, match="admin"):
        await app.set_group_quota(
            ANA, "team-a", Amount.from_units(cpu=2, memory_gib=8, gpu=0, instances=10)
        )
    with pytest.raises(PermissionDenied, match="admin"):
        await app.set_instance_type(ANA, "cpu.tiny", cpu=0.1, memory_gib=0.1, gpu=0)
    await app.set_group_quota(
        ADMIN, "team-a", Amount.from_units(cpu=2, memory_gib=8, gpu=0, instances=10)
    )
    await app.set_group_quota(
        ADMIN, "team-b", Amount.from_units(cpu=1, memory_gib=1, gpu=0, instances=1)
    )
    with pytest.raises(PermissionDenied, match="team-a"):
        await app.group_usage(BOB, "team-a")
    with pytest.raises(PermissionDenied, match="team-a"):
        await app.reserve(BOB, "team-a", "x", "dep", "cpu.small", 1)
    await InlineProjection(app.pool).sync()
    assert (await app.group_usage(ANA, "team-a")).group == "team-a"
    assert [g.group for g in await app.list_group_usage(BOB)] == ["team-b"]
    assert [g.group for g in await app.list_group_usage(ADMIN)] == ["team-a", "team-b"]


async def test_usage_projection_shows_limits_used_free(app: QuotaApp, pool: asyncpg.Pool) -> None:
    await app.set_group_quota(
        ADMIN, "team-a", Amount.from_units(cpu=2, memory_gib=8, gpu=0, instances=10)
    )
    await app.reserve(ANA, "team-a", "d1", "dep-1", "cpu.small", 2)
    await InlineProjection(pool).sync()
    usage = await app.group_usage(ANA, "team-a")
    assert usage.used == Amount(1000, 2048, 0, 2)
    assert usage.free == Amount(1000, 6144, 0, 8)
    assert [r.deployment for r in usage.reservations] == ["dep-1"]
    assert [t.name for t in await app.list_instance_types(BOB)] == ["cpu.small", "gpu.large"]


_groups = itertools.count()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    cpu=st.integers(min_value=0, max_value=8),
    instances_limit=st.integers(min_value=0, max_value=12),
    requests=st.lists(
        st.tuples(st.sampled_from(["cpu.small", "gpu.large"]), st.integers(1, 4)),
        min_size=1,
        max_size=16,
    ),
)
async def test_concurrent_reservations_never_over_commit(
    app: QuotaApp, cpu: int, instances_limit: int, requests: list[tuple[str, int]]
) -> None:
    """Whatever the interleaving, granted reservations fit the quota, and every refusal
    was right: with usage only growing, a refused request still does not fit at the end."""
    group = f"prop-{next(_groups)}"
    limits = Amount.from_units(cpu=cpu, memory_gib=32, gpu=2, instances=instances_limit)
    await app.set_group_quota(ADMIN, group, limits)
    admin = Principal(user="root", admin=True, groups=frozenset())

    async def attempt(i: int, itype: str, n: int) -> tuple[bool, Amount]:
        try:
            r = await app.reserve(admin, group, f"r{i}", f"dep-{i}", itype, n)
            return True, r.amount
        except ResourceExhausted:
            unit = Amount(500, 1024, 0, 1) if itype == "cpu.small" else Amount(4000, 16384, 1, 1)
            return False, unit.times(n)

    results = await asyncio.gather(*(attempt(i, t, n) for i, (t, n) in enumerate(requests)))
    granted = Amount()
    for ok, amount in results:
        if ok:
            granted = granted + amount
    assert not granted.shortfalls(limits), f"over-committed: {granted} > {limits}"
    final = await app.groups.load(group)
    assert final.used == granted
    for ok, amount in results:
        if not ok:
            assert amount.shortfalls(limits - granted), f"refused {amount} though it fits"


async def test_the_tutorials_refusal_reads_as_documented(app: QuotaApp) -> None:
    """docs/tutorial.md step 4 quotes this message."""
    await app.set_group_quota(
        ADMIN, "team-a", Amount.from_units(cpu=4, memory_gib=8, gpu=0, instances=8)
    )
    await app.reserve(ANA, "team-a", "iris:1", "iris", "cpu.small", 4)
    with pytest.raises(ResourceExhausted) as refused:
        await app.reserve(ANA, "team-a", "big:1", "big", "gpu.large", 1)
    assert refused.value.message == (
        "group team-a needs 4 CPU, 16 GiB memory, 1 GPU; 2 CPU, 4 GiB memory, 0 GPU free "
        "(quota: 4 CPU, 8 GiB memory, 0 GPU, 8 instances; "
        "used: 2 CPU, 4 GiB memory, 0 GPU, 4 instances)"
    )
