"""Who is calling: the principal, where handlers find it, and how tokens become principals.

The gRPC kit's server interceptor authenticates the ``authorization: Bearer <token>``
metadata of every non-public call through an :class:`Authenticator` and runs the handler
inside :func:`authenticated_as`; handlers (and the event metadata) then ask
:func:`current_principal`. Every service except the identity service itself uses
``CachingAuthenticator(RemoteAuthenticator(settings.keys_addr), settings.auth_cache_seconds)``
(:func:`authenticator_from_settings`); the identity service plugs in its own store.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from shipyard_core import validation
from shipyard_core.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable

if TYPE_CHECKING:
    from shipyard_core.settings import CommonSettings

__all__ = [
    "Authenticator",
    "CachingAuthenticator",
    "InternalTokenAuthenticator",
    "Principal",
    "RemoteAuthenticator",
    "authenticated_as",
    "authenticator_from_settings",
    "current_principal",
    "optional_principal",
    "reset_principal",
    "resolve_group",
    "set_principal",
]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a user, whether they are an admin, their groups, and the id
    (never the secret) of the token they used."""

    user: str
    admin: bool
    groups: frozenset[str] = field(default_factory=frozenset)
    token_id: str = ""
    internal: bool = False
    """A Shipyard service calling with the internal token (the gateway asking the scheduler
    for routes), not a person."""

    def __post_init__(self) -> None:
        # Accept any iterable of names (a protobuf repeated field, a list) but keep the
        # dataclass hashable and immutable.
        if not isinstance(self.groups, frozenset):
            object.__setattr__(self, "groups", frozenset(self.groups))

    def require_admin(self, action: str = "this operation") -> None:
        """Raises PermissionDenied unless the caller is an admin. ``action`` names what was
        attempted, e.g. ``"set a group quota"``."""
        if not self.admin:
            raise PermissionDenied(
                f"admin only: {action} (user {self.user!r} is not an admin; ask an admin)"
            )

    def require_member(self, group: str) -> None:
        """Raises PermissionDenied unless the caller belongs to ``group`` (admins always
        pass)."""
        if not self.can_see(group):
            raise PermissionDenied(
                f"user {self.user!r} is not a member of group {group!r}; "
                "ask an admin to add you to it"
            )

    def require_internal(self, action: str = "this operation") -> None:
        """Raises PermissionDenied unless the caller is a Shipyard service (internal token)
        or an admin."""
        if not (self.internal or self.admin):
            raise PermissionDenied(
                f"internal only: {action} is for Shipyard's own services (and admins)"
            )

    def can_see(self, group: str) -> bool:
        """Whether the caller may see things owned by ``group``: admins and members."""
        return self.admin or group in self.groups


def resolve_group(caller: Principal, group: str) -> str:
    """The group named, or the caller's only group when none is named; checks that the
    caller may act in it (admins may act in any group)."""
    if not group:
        if len(caller.groups) == 1:
            group = next(iter(caller.groups))
        else:
            choices = ", ".join(sorted(caller.groups)) or "none"
            raise InvalidArgument(
                "group", "is required here", f"pass --group (your groups: {choices})"
            )
    validation.name("group", group)
    caller.require_member(group)
    return group


_principal: ContextVar[Principal | None] = ContextVar("shipyard_principal", default=None)


def current_principal() -> Principal:
    """The caller of the current gRPC call. Raises Unauthenticated outside an authenticated
    call (a public method, a background task)."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated(
            "no authenticated caller in this context (public method or background task)"
        )
    return principal


def optional_principal() -> Principal | None:
    """The caller of the current call, or None when there is none."""
    return _principal.get()


def set_principal(principal: Principal | None) -> Token[Principal | None]:
    """Makes ``principal`` the current caller; pass the returned token to
    :func:`reset_principal`. Prefer :func:`authenticated_as`."""
    return _principal.set(principal)


def reset_principal(token: Token[Principal | None]) -> None:
    """Restores the caller that was current before the matching :func:`set_principal`."""
    _principal.reset(token)


@contextmanager
def authenticated_as(principal: Principal | None) -> Iterator[Principal | None]:
    """Runs the ``with`` body as ``principal`` (the interceptor, tests, policies that act on
    behalf of a user)."""
    token = _principal.set(principal)
    try:
        yield principal
    finally:
        _principal.reset(token)


@runtime_checkable
class Authenticator(Protocol):
    """Resolves a bearer token to the principal it belongs to."""

    async def authenticate(self, token: str) -> Principal:
        """The principal of ``token``. Raises Unauthenticated for an unknown, revoked or
        malformed token and Unavailable when the answer cannot be had right now."""
        ...


def _token_key(token: str) -> bytes:
    # The cache outlives the call, so it must not hold secrets: a heap dump or a debugger
    # shows digests, never tokens.
    return hashlib.sha256(token.encode()).digest()


class CachingAuthenticator:
    """Remembers the answers of ``inner`` for ``ttl_seconds``, keyed by the SHA-256 of the
    token, at most ``max_entries`` of them (least recently used go first).

    Only successes are cached: an Unauthenticated or Unavailable answer is asked again next
    time. Concurrent lookups of one token share one call to ``inner``, so a burst of
    requests from one client costs the identity service one call.
    """

    def __init__(
        self,
        inner: Authenticator,
        ttl_seconds: float = 1.0,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.inner = inner
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Principal]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def authenticate(self, token: str) -> Principal:
        """The principal of ``token``, from the cache when fresh, else from ``inner``."""
        if self.ttl_seconds <= 0:
            return await self.inner.authenticate(token)
        key = _token_key(token)
        now = self._clock()
        hit = self._entries.get(key)
        if hit is not None:
            expires, principal = hit
            if now < expires:
                self._entries.move_to_end(key)
                return principal
            del self._entries[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._lookup(key, token))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        # shield: one impatient caller being cancelled must not cancel the lookup the
        # others wait for.
        return await asyncio.shield(task)

    def _settled(self, key: bytes, task: asyncio.Task[Principal]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            # Marks the exception as retrieved: when every waiter was cancelled nobody else
            # reads it, and asyncio would log "exception was never retrieved".
            task.exception()

    async def _lookup(self, key: bytes, token: str) -> Principal:
        principal = await self.inner.authenticate(token)
        self._entries[key] = (self._clock() + self.ttl_seconds, principal)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return principal

    def forget(self, token: str) -> None:
        """Drops the cached answer for ``token`` (e.g. right after revoking it here)."""
        self._entries.pop(_token_key(token), None)

    def clear(self) -> None:
        """Drops every cached answer."""
        self._entries.clear()

    async def close(self) -> None:
        """Closes ``inner`` when it can be closed."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()


class RemoteAuthenticator:
    """Asks the identity service (``IdentityService.Authenticate`` at ``keys_addr``).

    The channel is opened on first use, inside the running event loop, and closed by
    :meth:`close`. UNAUTHENTICATED becomes Unauthenticated; UNAVAILABLE and
    DEADLINE_EXCEEDED become Unavailable; anything else the domain error of its status.
    """

    def __init__(self, keys_addr: str, *, timeout_seconds: float = 5.0) -> None:
        self.keys_addr = keys_addr
        self.timeout_seconds = timeout_seconds
        self._channel: Any = None
        self._stub: Any = None

    def _ensure_stub(self) -> Any:
        if self._stub is None:
            # Imported here: shipyard_core.grpckit imports this module, and processes that
            # authenticate locally need neither the channel nor the generated stubs.
            import grpc

            from shipyard.keys.v1 import identity_pb2_grpc
            from shipyard_core.grpckit.interceptors import TracingClientInterceptor

            self._channel = grpc.aio.insecure_channel(
                self.keys_addr, interceptors=[TracingClientInterceptor()]
            )
            self._stub = identity_pb2_grpc.IdentityServiceStub(self._channel)
        return self._stub

    async def authenticate(self, token: str) -> Principal:
        """The principal of ``token`` according to the identity service."""
        import grpc

        from shipyard.keys.v1 import identity_pb2
        from shipyard_core.grpckit.errors import error_from_rpc

        if not token:
            raise Unauthenticated("empty token")
        stub = self._ensure_stub()
        try:
            answer = await stub.Authenticate(
                identity_pb2.AuthenticateRequest(token=token), timeout=self.timeout_seconds
            )
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(err.details() or "invalid token") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    f"identity service unavailable at {self.keys_addr} ({err.details()}); "
                    "retry in a moment"
                ) from None
            raise error_from_rpc(err) from err
        return Principal(
            user=answer.user,
            admin=answer.admin,
            groups=frozenset(answer.groups),
            token_id=answer.token_id,
        )

    async def close(self) -> None:
        """Closes the channel to the identity service (if one was opened)."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()


INTERNAL_USER = "service:internal"


class InternalTokenAuthenticator:
    """Recognises the platform's internal token (``settings.internal_token``, shared by the
    services of one installation) and hands every other token to ``inner``."""

    def __init__(self, inner: Authenticator, internal_token: str) -> None:
        self.inner = inner
        self._digest = hashlib.sha256(internal_token.encode()).digest() if internal_token else b""

    async def authenticate(self, token: str) -> Principal:
        """The internal principal for the internal token, else ``inner``'s answer."""
        if self._digest and hmac.compare_digest(
            hashlib.sha256(token.encode()).digest(), self._digest
        ):
            return Principal(user=INTERNAL_USER, admin=False, internal=True)
        return await self.inner.authenticate(token)

    async def close(self) -> None:
        """Closes ``inner`` when it can be closed."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()


def authenticator_from_settings(settings: CommonSettings) -> Authenticator:
    """The authenticator every service but the identity service uses: the internal token,
    else the identity service at ``settings.keys_addr``, answers cached for
    ``settings.auth_cache_seconds``."""
    remote = CachingAuthenticator(
        RemoteAuthenticator(settings.keys_addr), ttl_seconds=settings.auth_cache_seconds
    )
    if not settings.internal_token:
        return remote
    return InternalTokenAuthenticator(remote, settings.internal_token)
