"""Principal, the principal context, and the caching authenticator."""

from __future__ import annotations

import asyncio

import pytest

from shipyard_core.auth import (
    Authenticator,
    CachingAuthenticator,
    Principal,
    authenticated_as,
    current_principal,
    optional_principal,
)
from shipyard_core.errors import PermissionDenied, Unauthenticated, Unavailable

ALICE = Principal(user="alice", admin=False, groups=frozenset({"team-a"}))
ROOT = Principal(user="root", admin=True, groups=frozenset())


def test_permissions() -> None:
    with pytest.raises(PermissionDenied, match=r"^admin only: set a group quota"):
        ALICE.require_admin("set a group quota")
    ROOT.require_admin("set a group quota")

    ALICE.require_member("team-a")
    ROOT.require_member("team-b")  # admins pass
    with pytest.raises(PermissionDenied, match="team-b"):
        ALICE.require_member("team-b")

    assert ALICE.can_see("team-a")
    assert not ALICE.can_see("team-b")
    assert ROOT.can_see("anything")


def test_groups_from_any_iterable_stay_frozen() -> None:
    principal = Principal(user="bob", admin=False, groups=["x", "y"])  # type: ignore[arg-type]
    assert principal.groups == frozenset({"x", "y"})
    assert hash(principal) == hash(Principal(user="bob", admin=False, groups=frozenset("xy")))


async def test_principal_context() -> None:
    assert optional_principal() is None
    with pytest.raises(Unauthenticated):
        current_principal()
    with authenticated_as(ALICE):
        assert current_principal() is ALICE

        async def in_a_task() -> Principal:
            return current_principal()

        # Tasks copy the context: work spawned by a handler keeps its caller.
        assert await asyncio.create_task(in_a_task()) is ALICE
    assert optional_principal() is None


class CountingAuthenticator:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.down = False

    async def authenticate(self, token: str) -> Principal:
        self.calls.append(token)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise Unavailable("identity service unavailable")
        if token == "bad":
            raise Unauthenticated("unknown or revoked token")
        return Principal(user=token, admin=False, groups=frozenset())


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_protocol() -> None:
    assert isinstance(CountingAuthenticator(), Authenticator)
    assert isinstance(CachingAuthenticator(CountingAuthenticator()), Authenticator)


async def test_cache_hits_until_ttl_then_asks_again() -> None:
    inner, clock = CountingAuthenticator(), FakeClock()
    cache = CachingAuthenticator(inner, ttl_seconds=1.0, clock=clock)
    assert (await cache.authenticate("tok-a")).user == "tok-a"
    assert (await cache.authenticate("tok-a")).user == "tok-a"
    assert inner.calls == ["tok-a"]
    clock.now += 1.01
    await cache.authenticate("tok-a")
    assert inner.calls == ["tok-a", "tok-a"]


async def test_cache_never_holds_the_token_itself() -> None:
    cache = CachingAuthenticator(CountingAuthenticator(), ttl_seconds=60)
    await cache.authenticate("s3cret-token")
    keys = list(cache._entries)
    assert len(keys) == 1
    assert b"s3cret-token" not in keys[0]


async def test_cache_is_bounded_lru() -> None:
    inner = CountingAuthenticator()
    cache = CachingAuthenticator(inner, ttl_seconds=60, max_entries=2)
    for token in ("a", "b", "a", "c"):  # "b" is least recently used when "c" arrives
        await cache.authenticate(token)
    assert len(cache) == 2
    inner.calls.clear()
    await cache.authenticate("a")
    await cache.authenticate("c")
    assert inner.calls == []
    await cache.authenticate("b")
    assert inner.calls == ["b"]


async def test_failures_are_not_cached() -> None:
    inner = CountingAuthenticator()
    cache = CachingAuthenticator(inner, ttl_seconds=60)
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await cache.authenticate("bad")
    inner.down = True
    with pytest.raises(Unavailable):
        await cache.authenticate("good")
    inner.down = False
    assert (await cache.authenticate("good")).user == "good"
    assert inner.calls == ["bad", "bad", "good", "good"]


async def test_concurrent_lookups_share_one_call() -> None:
    inner = CountingAuthenticator()
    inner.gate = asyncio.Event()
    cache = CachingAuthenticator(inner, ttl_seconds=60)
    waiters = [asyncio.create_task(cache.authenticate("tok")) for _ in range(5)]
    async with asyncio.timeout(5):
        await inner.entered.wait()
    # One waiter giving up must not fail the others.
    waiters[0].cancel()
    inner.gate.set()
    results = await asyncio.gather(*waiters[1:])
    assert {p.user for p in results} == {"tok"}
    assert inner.calls == ["tok"]


async def test_zero_ttl_disables_the_cache() -> None:
    inner = CountingAuthenticator()
    cache = CachingAuthenticator(inner, ttl_seconds=0)
    await cache.authenticate("t")
    await cache.authenticate("t")
    assert inner.calls == ["t", "t"]
    assert len(cache) == 0
