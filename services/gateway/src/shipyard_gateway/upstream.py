"""HTTP to the model servers (``shipyard-runtime`` instances): one pooled client.

Failures are sorted by whether the request can have reached a model, because only a
request that certainly did not may be sent to another instance (``predict()`` is not
known to be idempotent, and a second run doubles the cost or the side effect):

- the connection could not be established (refused, unreachable, connect timeout):
  :class:`ConnectFailed`, safe to retry elsewhere;
- the model server did not answer in ``upstream_timeout_seconds``:
  :class:`~shipyard_gateway.errors.UpstreamTimeout` (504);
- the exchange broke after the request was sent (disconnect, malformed response):
  :class:`~shipyard_gateway.errors.BadGateway` (502).

Why hand-written rather than aiohttp's client: this is on every prediction's path, and
the general client spent about a fifth of the gateway's CPU per request (request and
response objects, header multidicts, a write per part). Here a request is one
``transport.write`` of bytes built in one go, and the answer is parsed straight from the
buffer of an :class:`asyncio.Protocol`, with no task or stream in between. It speaks only
what model servers need: HTTP/1.1 keep-alive, ``Content-Length`` or chunked answers (or
an answer ending with the connection), no redirects, no cookies, no TLS.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from shipyard_gateway.errors import BadGateway, UpstreamTimeout

__all__ = ["ConnectFailed", "UpstreamClient", "UpstreamReply"]

log = logging.getLogger(__name__)

# Below the runtime's keep-alive timeout (75 s by default): the gateway drops an idle
# pooled connection before the model server does, so a request is never written into a
# connection the server is closing (which would fail it after sending, with no retry).
_KEEPALIVE_SECONDS = 15.0
_MAX_HEAD = 64 * 1024

_BROKEN = (
    "the model server closed the connection or sent a malformed answer before finishing "
    "(it may have crashed); the request was not retried because it may have reached the model"
)


class ConnectFailed(Exception):
    """No connection to ``address`` could be made: the request did not leave the gateway.
    Internal to the gateway (the handler retries elsewhere); never shown to a caller."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot connect to {address}: {reason}")
        self.address = address
        self.reason = reason


class _Malformed(Exception):
    """The answer is not HTTP/1.1 we understand (logged; the caller gets BadGateway)."""


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A model server's answer, unchanged."""

    status: int
    body: bytes
    content_type: str


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one exchange at a time."""

    __slots__ = (
        "address",
        "body_left",
        "buf",
        "chunked",
        "closed",
        "content_type",
        "head_done",
        "idle_since",
        "keep_alive",
        "status",
        "to_close",
        "transport",
        "waiter",
    )

    def __init__(self, address: str) -> None:
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[UpstreamReply] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.head_done = False
        self.status = 0
        self.content_type = "application/json"
        self.body_left = -1  # -1: unknown (chunked, or until the connection closes)
        self.chunked = False
        self.keep_alive = True
        self.to_close = False

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.close()
            return
        self.buf += data
        try:
            reply = self._parse()
        except _Malformed as exc:
            log.warning("model server %s sent a malformed answer: %s", self.address, exc)
            self._fail(BadGateway(_BROKEN))
            self.close()
            return
        if reply is not None:
            self.waiter.set_result(reply)

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.head_done and self.body_left == -1 and not self.chunked:
            # An answer without a length ends with the connection.
            waiter.set_result(UpstreamReply(self.status, bytes(self.buf), self.content_type))
            return
        if exc is not None:
            log.warning("model server %s broke the exchange: %r", self.address, exc)
        waiter.set_exception(BadGateway(_BROKEN))

    # -- exchange ---------------------------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future[UpstreamReply]:
        """Writes one whole request; the future completes with its answer."""
        assert self.transport is not None
        self._reset()
        self.buf.clear()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        """Closes the connection (it is never reused)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        """Whether the last exchange left the connection fit for another one."""
        return not self.closed and self.keep_alive and not self.buf

    def _parse(self) -> UpstreamReply | None:
        buf = self.buf
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise _Malformed("response head over 64 KiB")
                return None
            self._parse_head(bytes(buf[:end]))
            del buf[: end + 4]
            if 100 <= self.status < 200:  # an interim answer: the real one follows
                self.head_done = False
                return self._parse()
        if self.chunked:
            return self._parse_chunked()
        if self.body_left < 0:
            return None  # until the connection closes
        if len(buf) < self.body_left:
            return None
        if len(buf) > self.body_left:
            raise _Malformed("more bytes than Content-Length")
        body = bytes(buf)
        buf.clear()
        return UpstreamReply(self.status, body, self.content_type)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise _Malformed(f"status line {lines[0][:80]!r}")
        try:
            self.status = int(status_line[1])
        except ValueError:
            raise _Malformed(f"status line {lines[0][:80]!r}") from None
        http10 = status_line[0] == b"HTTP/1.0"
        self.keep_alive = not http10
        self.head_done = True
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise _Malformed(f"header line {line[:80]!r}")
            key = name.strip().lower()
            if key == b"content-length":
                try:
                    self.body_left = int(value)
                except ValueError:
                    raise _Malformed(f"Content-Length {value[:40]!r}") from None
            elif key == b"content-type":
                self.content_type = value.strip().decode("latin-1")
            elif key == b"transfer-encoding":
                self.chunked = value.strip().lower().endswith(b"chunked")
            elif key == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    self.keep_alive = False
                elif token == b"keep-alive":
                    self.keep_alive = True
        if self.status in (204, 304):
            self.body_left = 0
        if self.body_left < 0 and not self.chunked:
            self.keep_alive = False  # the body ends with the connection

    def _parse_chunked(self) -> UpstreamReply | None:
        # Cheap enough to re-scan: model servers answer with Content-Length, and chunked
        # answers are rare and small here.
        buf = self.buf
        pos = 0
        parts: list[bytes] = []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            try:
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            except ValueError:
                raise _Malformed("chunk size line") from None
            pos = eol + 2
            if size == 0:
                end = buf.find(b"\r\n\r\n", pos - 2)  # trailers end with an empty line
                if end < 0:
                    return None
                if end + 4 != len(buf):
                    raise _Malformed("bytes after the last chunk")
                buf.clear()
                return UpstreamReply(self.status, b"".join(parts), self.content_type)
            if len(buf) < pos + size + 2:
                return None
            parts.append(bytes(buf[pos : pos + size]))
            pos += size + 2


class _Pool:
    """The connections to one address: idle ones (newest last) and a cap on open ones."""

    __slots__ = ("idle", "open", "waiters")

    def __init__(self) -> None:
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[None]] = deque()


class UpstreamClient:
    """A keep-alive pool of connections to model servers, shared by every request."""

    def __init__(
        self,
        *,
        timeout_seconds: float,
        connect_timeout_seconds: float,
        connections_per_host: int,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.connect_timeout_seconds = connect_timeout_seconds
        self.connections_per_host = connections_per_host
        self._pools: dict[str, _Pool] = {}
        self._closed = False

    async def post(
        self, address: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> UpstreamReply:
        """POSTs ``body`` to ``http://<address><path>`` (see :meth:`request`)."""
        return await self.request("POST", address, path, body, headers)

    async def request(
        self, method: str, address: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> UpstreamReply:
        """Sends ``method`` ``http://<address><path>`` with ``body`` (empty for GET) and
        returns the answer as is.

        ``upstream_timeout_seconds`` covers waiting for a pooled connection, connecting,
        sending and reading the whole answer. Raises ConnectFailed (not sent; retry
        elsewhere), UpstreamTimeout or BadGateway.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_seconds
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = _Pool()
        conn = await self._acquire(pool, address, deadline)
        ok = False
        try:
            parts = [f"{method} {path} HTTP/1.1\r\nHost: {address}\r\n"]
            parts.extend(f"{k}: {v}\r\n" for k, v in headers.items())
            if body or method == "POST":
                parts.append(f"Content-Length: {len(body)}\r\n")
            parts.append("\r\n")
            waiter = conn.send("".join(parts).encode() + body)
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                reply = await waiter
            finally:
                timer.cancel()
            ok = True
            return reply
        except _Expired:
            raise UpstreamTimeout(
                f"the model server did not answer within {self.timeout_seconds:g}s; "
                "the request may still be running there"
            ) from None
        finally:
            self._release(pool, conn, reusable=ok and conn.reusable)

    async def _acquire(self, pool: _Pool, address: str, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            while pool.idle:
                conn = pool.idle.pop()
                if not conn.closed and now - conn.idle_since < _KEEPALIVE_SECONDS:
                    return conn
                pool.open -= 1
                conn.close()
            if pool.open < self.connections_per_host:
                pool.open += 1
                try:
                    return await self._connect(address, deadline)
                except BaseException:
                    pool.open -= 1
                    self._wake(pool)
                    raise
            # At the cap: wait for a connection to come back (or a slot to free).
            waiter = loop.create_future()
            pool.waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            except _Expired:
                raise UpstreamTimeout(
                    f"no connection to the model server became free within "
                    f"{self.timeout_seconds:g}s"
                ) from None
            finally:
                timer.cancel()
                if waiter in pool.waiters:
                    pool.waiters.remove(waiter)

    async def _connect(self, address: str, deadline: float) -> _Connection:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        loop = asyncio.get_running_loop()
        timeout = min(self.connect_timeout_seconds, max(0.0, deadline - loop.time()))
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(address), host, int(port)
                )
        except TimeoutError:
            raise ConnectFailed(address, f"no connection within {timeout:g}s") from None
        except (OSError, ValueError) as exc:
            raise ConnectFailed(address, str(exc) or type(exc).__name__) from exc
        return conn

    def _release(self, pool: _Pool, conn: _Connection, *, reusable: bool) -> None:
        conn.waiter = None
        if reusable and not self._closed:
            conn.idle_since = asyncio.get_running_loop().time()
            pool.idle.append(conn)
        else:
            pool.open -= 1
            conn.close()
        self._wake(pool)

    @staticmethod
    def _wake(pool: _Pool) -> None:
        while pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Closes every pooled connection (call after requests finished)."""
        self._closed = True
        for pool in self._pools.values():
            for conn in pool.idle:
                conn.close()
            pool.open -= len(pool.idle)
            pool.idle.clear()
        self._pools.clear()


class _Expired(Exception):
    """The deadline of one exchange passed (internal; becomes UpstreamTimeout)."""


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_Expired())
