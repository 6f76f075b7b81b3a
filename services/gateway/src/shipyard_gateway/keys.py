"""Deployment client keys, verified through the keys service.

``ClientKeyService.VerifyClientKey`` (at ``settings.keys_addr``, called with the internal
token) says whose key a secret is for one deployment, or refuses it. Its answers are
cached so that a client sending thousands of requests a second costs the keys service one
call a second, and no more than that, because revocation must reach the gateway within
one second:

- a positive answer is reused for ``ttl_seconds`` (at most 1 s, see
  ``settings.client_key_cache_seconds``), keyed by the SHA-256 of (deployment, client,
  secret): the cache never holds a secret;
- a refusal is never cached: a key created a moment ago works at once, and a wrong key is
  asked about again (concurrent lookups are collapsed, so a burst is still one call);
- concurrent lookups of one key share one call (single flight).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from shipyard.keys.v1 import client_keys_pb2, client_keys_pb2_grpc
from shipyard_core.auth import Principal
from shipyard_core.errors import Unauthenticated, Unavailable
from shipyard_core.grpckit.interceptors import TracingClientInterceptor, bearer_metadata

__all__ = ["CLIENT_KEY_PREFIX", "ClientKeyVerifier", "KeyVerifier"]

log = logging.getLogger(__name__)

CLIENT_KEY_PREFIX = "sk_"
"""What every client key secret starts with (user tokens start with ``sy_``)."""

# Refusals the keys service may give for a key that does not open this deployment; the
# caller sees 401 with its reason either way.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


class KeyVerifier(Protocol):
    """What :class:`~shipyard_gateway.access.AccessControl` needs: a client key checked
    for a deployment."""

    async def verify(
        self, deployment: str, secret: str, client: str = "", *, group: str = ""
    ) -> Principal:
        """The caller (``user`` = the client's name, ``groups`` = ``{group}``, the
        deployment's) a key stands for; raises Unauthenticated (refused) or Unavailable
        (no answer to be had now)."""
        ...


class ClientKeyVerifier:
    """``VerifyClientKey`` at ``addr`` with a short positive cache (module docstring).

    The channel is opened on first use, inside the running event loop, and closed by
    :meth:`close`.
    """

    def __init__(
        self,
        addr: str,
        internal_token: str,
        *,
        ttl_seconds: float = 1.0,
        timeout_seconds: float = 5.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.addr = addr
        self.ttl_seconds = ttl_seconds
        self.timeout_seconds = timeout_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._metadata = bearer_metadata(internal_token) if internal_token else ()
        self._entries: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Principal]] = {}
        self._channel: Any = None
        self._stub: Any = None
        self.calls = 0
        """How many times the keys service was asked (for tests and logs)."""

    def __len__(self) -> int:
        return len(self._entries)

    async def verify(
        self, deployment: str, secret: str, client: str = "", *, group: str = ""
    ) -> Principal:
        """The caller a client key stands for on ``deployment``: ``user`` is the client's
        name (what the model sees in ``X-Forwarded-User``), ``token_id`` the key's id,
        ``groups`` the deployment's ``group`` (the key opens that deployment, so the
        caller passes the same membership check as the group's users). ``client`` is the
        name HTTP Basic gave (it must match the key's), else empty."""
        key = hashlib.sha256(f"{deployment}\0{client}\0{secret}".encode()).digest()
        hit = self._entries.get(key)
        if hit is not None:
            if self._clock() < hit[0]:
                return hit[1]
            del self._entries[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._lookup(key, deployment, secret, client, group))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        # shield: one impatient caller going away must not cancel the lookup the others
        # wait for.
        return await asyncio.shield(task)

    def _settled(self, key: bytes, task: asyncio.Task[Principal]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have been cancelled

    def _ensure_stub(self) -> Any:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.addr, interceptors=[TracingClientInterceptor()]
            )
            self._stub = client_keys_pb2_grpc.ClientKeyServiceStub(self._channel)
        return self._stub

    async def _lookup(
        self, key: bytes, deployment: str, secret: str, client: str, group: str
    ) -> Principal:
        stub = self._ensure_stub()
        self.calls += 1
        # The answer holds from when it was asked: a revocation that lands during the call
        # still takes effect within ttl_seconds of itself.
        asked = self._clock()
        try:
            answer = await stub.VerifyClientKey(
                client_keys_pb2.VerifyClientKeyRequest(
                    deployment=deployment, secret=secret, client=client
                ),
                metadata=self._metadata,
                timeout=self.timeout_seconds,
            )
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code in _REFUSALS:
                raise Unauthenticated(
                    f"client key refused for deployment {deployment!r}: "
                    f"{err.details() or 'unknown or revoked key'}"
                ) from None
            # Unavailable, deadline, unimplemented, internal: the key may be fine, the
            # gateway cannot tell now. Where and why goes to the log, not to the caller.
            log.warning("VerifyClientKey at %s failed: %s %s", self.addr, code.name, err.details())
            raise Unavailable(
                "client keys cannot be verified right now (the keys service did not "
                "answer); retry shortly"
            ) from None
        principal = Principal(
            user=answer.client,
            admin=False,
            groups=frozenset((group,)) if group else frozenset(),
            token_id=answer.key_id,
        )
        if self.ttl_seconds > 0:
            self._entries[key] = (asked + self.ttl_seconds, principal)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return principal

    async def close(self) -> None:
        """Closes the channel to the keys service (if one was opened)."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()
