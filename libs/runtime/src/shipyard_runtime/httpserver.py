"""A minimal HTTP/1.1 server on asyncio's Protocol API, one per worker process.

Why hand-written: the runtime may use the standard library only, and ``http.server`` is
thread-per-connection and slow. This one is event-driven, keeps connections alive, and
handles each request inline in ``data_received``: predict() runs on the loop (one model
copy per process; the workers are the parallelism), so a request costs no task, no future
and no thread hop.

Supported: Content-Length and chunked request bodies, ``Expect: 100-continue``,
keep-alive (HTTP/1.1 default, HTTP/1.0 on request), pipelining (answered in order), a body
limit answered with 413 before the body is read, an idle timeout, and a graceful drain.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import time
from typing import Any

from shipyard_runtime import codec
from shipyard_runtime.app import App, Prepared, Route
from shipyard_runtime.balance import DEFER_SECONDS, NOT_ACCEPTING, ConnectionTable

log = logging.getLogger("shipyard_runtime")
access_log = logging.getLogger("shipyard_runtime.access")

MAX_HEAD = 64 * 1024
# After a 413 the rest of the upload is read and dropped (closing at once would reset the
# connection before the client reads the answer) until it pauses this long, or at most:
_LINGER_SECONDS = 2.0
_LINGER_MAX_SECONDS = 30.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    503: "Service Unavailable",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode()


_STATUS_LINES = {status: _status_line(status) for status in _REASONS}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Head:
    """A parsed request head waiting for (the rest of) its body."""

    __slots__ = (
        "chunk_left",
        "chunk_state",
        "chunks",
        "continue_sent",
        "expect_continue",
        "headers",
        "http10",
        "keep_alive",
        "length",
        "method",
        "received",
        "route",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        keep_alive: bool,
        http10: bool,
        route: Route,
        length: int,
    ) -> None:
        self.method = method
        self.http10 = http10
        self.target = target
        self.headers = headers
        self.keep_alive = keep_alive
        self.route = route
        self.length = length  # -1: chunked
        self.expect_continue = headers.get("expect", "").lower() == "100-continue"
        self.continue_sent = False
        self.chunk_state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self.chunk_left = 0
        self.chunks: list[bytes] = []
        self.received = 0


class HttpConnection(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "app",
        "buf",
        "closed",
        "discard_since",
        "discarding",
        "head",
        "last_active",
        "server",
        "tr",
        "waiting",
    )

    def __init__(self, server: WorkerServer) -> None:
        self.server = server
        self.app = server.app
        self.tr: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: _Head | None = None
        self.closed = False
        self.discarding = False
        self.discard_since = 0.0
        self.last_active = server.clock
        # A request handed to the batch and not answered yet: later pipelined requests
        # wait in ``buf`` so that answers go out in order.
        self.waiting: _Head | None = None

    # -- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.tr = transport
        self.server.connections.add(self)
        self.server.publish()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.forget(self)

    def pause_writing(self) -> None:
        # The client is not reading its responses: stop reading its requests.
        if self.tr is not None and not self.closed:
            self.tr.pause_reading()

    def resume_writing(self) -> None:
        if self.tr is not None and not self.closed:
            self.tr.resume_reading()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def data_received(self, data: bytes) -> None:
        self.last_active = self.server.clock
        if self.discarding or self.closed:
            return
        self.buf += data
        if self.waiting is None:
            self._process()

    def _process(self) -> None:
        buf = self.buf
        try:
            while not self.closed and self.waiting is None:
                head = self.head
                if head is None:
                    if not buf:
                        return
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > MAX_HEAD:
                            raise _HttpError(431, "the request head is over 64 KiB")
                        return
                    head = self._parse_head(end)
                    if head is None:
                        return
                    self.head = head
                if head.length >= 0:
                    length = head.length
                    if len(buf) < length:
                        self._maybe_continue(head)
                        return
                    if length == len(buf):
                        body = bytes(buf)
                        buf.clear()
                    elif length:
                        body = bytes(buf[:length])
                        del buf[:length]
                    else:
                        body = b""
                else:
                    chunked = self._read_chunked(head)
                    if chunked is None:
                        self._maybe_continue(head)
                        return
                    body = chunked
                self.head = None
                self._respond(head, body)
        except _HttpError as exc:
            route = self.head.route if self.head is not None else None
            self._refuse(exc.status, exc.message, route)
        except Exception:
            log.exception("internal error while handling a request")
            self._refuse(500, "internal error", None)

    # -- parsing --------------------------------------------------------------------

    def _parse_head(self, end: int) -> _Head | None:
        buf = self.buf
        text = bytes(buf[:end]).decode("latin-1")
        del buf[: end + 4]
        # RFC 9112 §2.2: ignore blank lines before a request line.
        text = text.lstrip("\r\n")
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _HttpError(400, f"malformed request line {lines[0][:100]!r}")
        method, target, version = parts
        if version == "HTTP/1.1":
            keep_alive = True
        elif version == "HTTP/1.0":
            keep_alive = False
        else:
            raise _HttpError(505, f"{version[:20]!r} is not supported: use HTTP/1.1")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t":
                raise _HttpError(400, f"malformed header line {line[:100]!r}")
            name = name.lower()
            value = value.strip()
            previous = headers.get(name)
            headers[name] = value if previous is None else f"{previous}, {value}"

        if target.startswith(("http://", "https://")):
            # absolute-form (a proxy's request): keep the path
            slash = target.find("/", target.find("//") + 2)
            target = target[slash:] if slash >= 0 else "/"
        route = self.app.resolve(target)

        connection = headers.get("connection")
        if connection is not None:
            connection = connection.lower()
            if "close" in connection:
                keep_alive = False
            elif "keep-alive" in connection:
                keep_alive = True

        transfer_encoding = headers.get("transfer-encoding")
        if transfer_encoding is not None:
            # Both at once is how requests get smuggled past proxies: refuse.
            if "content-length" in headers:
                raise _HttpError(400, "send either Content-Length or Transfer-Encoding, not both")
            if transfer_encoding.lower() != "chunked":
                raise _HttpError(
                    501,
                    f"Transfer-Encoding {transfer_encoding!r} is not supported: "
                    "send Content-Length or chunked",
                )
            length = -1
        else:
            content_length = headers.get("content-length")
            if content_length is None:
                length = 0
            elif content_length.isascii() and content_length.isdigit():
                length = int(content_length)
            else:
                raise _HttpError(400, f"invalid Content-Length {content_length[:40]!r}")
            if length > self.server.max_body:
                self._refuse_too_large(route)
                return None
        return _Head(method, target, headers, keep_alive, version == "HTTP/1.0", route, length)

    def _maybe_continue(self, head: _Head) -> None:
        if head.expect_continue and not head.continue_sent and not self.discarding:
            head.continue_sent = True
            if self.tr is not None:
                self.tr.write(_CONTINUE)

    def _read_chunked(self, head: _Head) -> bytes | None:
        buf = self.buf
        while True:
            state = head.chunk_state
            if state == 0:  # chunk size line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        raise _HttpError(400, "malformed chunk size line")
                    return None
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise _HttpError(400, "malformed chunk size") from None
                del buf[: end + 2]
                if size < 0:
                    raise _HttpError(400, "malformed chunk size")
                if size == 0:
                    head.chunk_state = 3
                    continue
                head.received += size
                if head.received > self.server.max_body:
                    self._refuse_too_large(head.route)
                    return None
                head.chunk_left = size
                head.chunk_state = 1
            elif state == 1:  # chunk data
                take = min(len(buf), head.chunk_left)
                if take:
                    head.chunks.append(bytes(buf[:take]))
                    del buf[:take]
                    head.chunk_left -= take
                if head.chunk_left:
                    return None
                head.chunk_state = 2
            elif state == 2:  # CRLF after the data
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise _HttpError(400, "malformed chunk: data not followed by CRLF")
                del buf[:2]
                head.chunk_state = 0
            else:  # trailer fields until an empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise _HttpError(431, "chunked trailers are over 64 KiB")
                    return None
                del buf[: end + 2]
                if end == 0:
                    body = b"".join(head.chunks)
                    head.chunks = []
                    return body

    # -- responding -----------------------------------------------------------------

    def _respond(self, head: _Head, body: bytes) -> None:
        started = time.perf_counter() if self.server.access_log else 0.0
        method = head.method
        route = head.route
        handler = route.methods.get(method)
        send_body = method != "HEAD"
        if handler is None and not send_body:
            handler = route.methods.get("GET")
        if handler is not None:
            if route.decode is not None and method == "POST" and self.server.max_batch > 1:
                decoded = self.app.decode(route, head.headers, body)
                if not isinstance(decoded, tuple):
                    self.waiting = head
                    self.server.batch(self, decoded, started)
                    return
                status, payload = decoded
            else:
                status, payload = handler(head.headers, body)
            extra = b""
            if route.content_type is not None and status == 200:
                extra = b"Content-Type: " + route.content_type.encode() + b"\r\n"
        elif not route.methods:
            status, payload = 404, self.app.unknown_path(method, head.target.partition("?")[0])
            extra = b""
        else:
            status = 405
            payload = route.error(405, f"method {method} is not allowed here; use {route.allow}")
            extra = b"Allow: " + route.allow.encode() + b"\r\n"
        self._answer(head, status, payload if send_body else b"", extra, len(payload), started)

    def answer_batched(self, status: int, payload: bytes, started: float) -> None:
        """Answers the request this connection handed to the batch, then goes on with the
        requests pipelined behind it."""
        head = self.waiting
        if head is None:
            return
        self.waiting = None
        self._answer(head, status, payload, b"", len(payload), started)
        if self.buf and not self.closed:
            self._process()

    def _answer(
        self, head: _Head, status: int, payload: bytes, extra: bytes, length: int, started: float
    ) -> None:
        keep_alive = head.keep_alive and not self.server.draining
        self._write(status, payload, keep_alive, head, extra, length)
        if self.server.access_log:
            access_log.info(
                "%s %s %d %.2fms",
                head.method,
                head.target,
                status,
                (time.perf_counter() - started) * 1000,
            )
        if not keep_alive:
            self._close()
        else:
            # After a long predict() the idle clock starts now, not at the request.
            self.last_active = time.monotonic()

    def _write(
        self,
        status: int,
        payload: bytes,
        keep_alive: bool,
        head: _Head | None,
        extra: bytes = b"",
        length: int | None = None,
    ) -> None:
        tr = self.tr
        if tr is None or self.closed:
            return
        if not keep_alive:
            connection = b"Connection: close\r\n"
        elif head is not None and head.http10:
            connection = b"Connection: keep-alive\r\n"  # HTTP/1.0 clients must hear it
        else:
            connection = b""
        status_line = _STATUS_LINES.get(status) or _status_line(status)
        tr.write(
            b"".join(
                (
                    status_line,
                    self.server.common_headers,
                    b"" if extra.startswith(b"Content-Type") else _JSON_CONTENT_TYPE,
                    b"Content-Length: ",
                    str(len(payload) if length is None else length).encode(),
                    b"\r\n",
                    connection,
                    extra,
                    b"\r\n",
                    payload,
                )
            )
        )

    def _refuse(self, status: int, message: str, route: Route | None) -> None:
        """Answers with an error and closes: the connection's framing can't be trusted."""
        error = route.error if route is not None else _plain_error
        self._write(status, error(status, message), False, None)
        self.head = None
        self._close()

    def _refuse_too_large(self, route: Route) -> None:
        limit = self.server.max_body
        message = (
            f"the request body is over the limit of {limit} bytes ({_human(limit)}); "
            "send smaller requests (or raise the server's --max-body)"
        )
        self._write(413, route.error(413, message), False, None)
        # Closing now would reset the connection while the client is still sending, and
        # it might never read the 413: stop writing, swallow the rest for a moment.
        self.head = None
        self.buf.clear()
        self.discarding = True
        self.discard_since = time.monotonic()
        if self.tr is not None and self.tr.can_write_eof():
            self.tr.write_eof()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.tr is not None:
                self.tr.close()

    def idle(self) -> bool:
        """No request in progress (safe to close during a drain)."""
        return self.head is None and not self.buf and self.waiting is None


_JSON_CONTENT_TYPE = b"Content-Type: application/json\r\n"
"""Every answer's, except a route's that names its own (``Route.content_type``)."""


def _plain_error(status: int, message: str) -> bytes:
    return codec.dumps({"error": message})


def _human(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


class WorkerServer:
    """Accepts connections on the shared listening socket and tracks them."""

    def __init__(
        self,
        app: App,
        sock: socket.socket,
        max_body: int,
        keepalive_timeout: float,
        access_log: bool = False,
        table: ConnectionTable | None = None,
        slot: int = 0,
        max_batch: int = 32,
    ) -> None:
        self.app = app
        self.max_batch = max_batch
        """Most requests answered by one ``predict_batch()`` call (1: no batching)."""
        self._batch: list[tuple[HttpConnection, Prepared, float]] = []
        self._flush_handle: asyncio.Handle | None = None
        self.table = table
        self.slot = slot
        self.sock = sock
        self.max_body = max_body
        self.keepalive_timeout = keepalive_timeout
        self.access_log = access_log
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.clock = time.monotonic()
        self.common_headers = b""
        self._tick_handle: asyncio.TimerHandle | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        self._all_closed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._refresh()

    def _refresh(self) -> None:
        self.clock = time.monotonic()
        # Date changes once a second: build the shared headers once a second, not per
        # response.
        date = email.utils.formatdate(usegmt=True)
        self.common_headers = f"Server: shipyard-runtime\r\nDate: {date}\r\n".encode()

    def start(self) -> None:
        """Starts accepting connections and the once-a-second housekeeping."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._accept)
        self._accepting = True
        self.publish()
        self._tick_handle = loop.call_later(1.0, self._tick)

    def _accept(self) -> None:
        table = self.table
        if table is not None:
            mine = len(self.connections) + len(self._pending)
            if mine:
                fewest = table.fewest_elsewhere(self.slot)
                if fewest is not None and fewest < mine:
                    # A sibling holds fewer connections: let it win this one (see
                    # balance.py), then try once ourselves in case it is busy.
                    assert self._loop is not None
                    self._loop.remove_reader(self.sock.fileno())
                    self._loop.call_later(DEFER_SECONDS, self._accept_after_deferring)
                    return
        self._accept_one()

    def _accept_after_deferring(self) -> None:
        if self._loop is None or not self._accepting:
            return
        self._accept_one()
        if self._accepting:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def _accept_one(self) -> None:
        # One connection per wake-up, not a burst, so that connections spread.
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # Out of file descriptors: back off briefly instead of spinning on the socket.
            log.error("accept failed: %s", exc)
            if self._loop is not None and self._accepting:
                self._loop.remove_reader(self.sock.fileno())
                self._loop.call_later(0.5, self._resume_accept)
            return
        conn.setblocking(False)
        assert self._loop is not None
        task = self._loop.create_task(self._loop.connect_accepted_socket(self._protocol, conn))
        self._pending.add(task)
        task.add_done_callback(self._accepted)
        self.publish()

    def publish(self) -> None:
        """Publishes this worker's connection count for its siblings."""
        if self.table is not None:
            count = len(self.connections) + len(self._pending)
            self.table.set(self.slot, count if self._accepting else NOT_ACCEPTING)

    def _accepted(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        self.publish()
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not set up a connection: %s", task.exception())

    def _resume_accept(self) -> None:
        if self._loop is not None and self._accepting:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def batch(self, conn: HttpConnection, prepared: Prepared, started: float) -> None:
        """Adaptive batching: a decoded prediction joins the requests of this event-loop
        turn; they are answered together right after it (:meth:`flush`), so a request
        never waits for company that is not already there, and a full batch goes at once.
        """
        self._batch.append((conn, prepared, started))
        if len(self._batch) >= self.max_batch:
            self.flush()
        elif self._flush_handle is None:
            assert self._loop is not None
            self._flush_handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Runs the collected predictions (one ``predict_batch()`` for several) and
        answers each on its connection."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            answers = self.app.run_batch([prepared for _, prepared, _ in batch])
        except Exception:  # run_batch answers every failure itself; this is a bug
            log.exception("internal error while answering a batch")
            answers = [(500, p.error(500, "internal error")) for _, p, _ in batch]
        for (conn, _, started), (status, payload) in zip(batch, answers, strict=True):
            conn.answer_batched(status, payload, started)

    def _protocol(self) -> HttpConnection:
        return HttpConnection(self)

    def _tick(self) -> None:
        self._refresh()
        now = self.clock
        for conn in list(self.connections):
            quiet = now - conn.last_active
            if conn.discarding:
                # A refused upload gets a moment to stop, not forever.
                if quiet > _LINGER_SECONDS or now - conn.discard_since > _LINGER_MAX_SECONDS:
                    conn._close()
            elif quiet > self.keepalive_timeout:
                conn._close()
        if self._loop is not None:
            self._tick_handle = self._loop.call_later(1.0, self._tick)

    def forget(self, conn: HttpConnection) -> None:
        """Called when a connection is gone."""
        self.connections.discard(conn)
        self.publish()
        if self.draining and not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - a deadline, not a scope
        """Stops accepting, closes idle connections, lets requests in progress finish
        (their responses say ``Connection: close``) for up to ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        self.draining = True
        self.app.draining = True  # readiness probes now answer 503
        if self._accepting:
            self._accepting = False
            self.publish()
            loop.remove_reader(self.sock.fileno())
            # Closes this process's copy only: the other workers keep accepting.
            self.sock.close()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            if conn.idle():
                conn._close()
        if self.connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except asyncio.TimeoutError:  # noqa: UP041 - a different class on 3.10
                log.warning(
                    "%d connection(s) still busy after %.1fs; closing them",
                    len(self.connections),
                    timeout,
                )
                for conn in list(self.connections):
                    conn._close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
