"""The gateway's HTTP client to model servers, against real sockets.

The peer is a small asyncio server whose behaviour each test chooses (answer with a
length, chunked, until close; hang; hang up), so the failure classes the handler relies
on (ConnectFailed: never sent; UpstreamTimeout; BadGateway) are checked on real TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from shipyard_core.embedded._process import free_port
from shipyard_gateway.errors import BadGateway, UpstreamTimeout
from shipyard_gateway.upstream import ConnectFailed, UpstreamClient
from shipyard_testing import wait_for

Behaviour = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]
"""Gets one request (head + body), answers on the writer; False closes the connection."""


class Peer:
    """A model server stand-in on a free port that counts connections and requests."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.requests: list[bytes] = []
        self.address = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.behaviour(request, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def peer(behaviour: Behaviour) -> AsyncIterator[Peer]:
    p = Peer(behaviour)
    server = await asyncio.start_server(p._serve, "127.0.0.1", 0)
    p.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield p


def client(**overrides: float) -> UpstreamClient:
    settings = {"timeout_seconds": 5.0, "connect_timeout_seconds": 2.0, "connections_per_host": 8}
    settings.update(overrides)
    return UpstreamClient(
        timeout_seconds=settings["timeout_seconds"],
        connect_timeout_seconds=settings["connect_timeout_seconds"],
        connections_per_host=int(settings["connections_per_host"]),
    )


async def echo(request: bytes, writer: asyncio.StreamWriter) -> bool:
    body = request.split(b"\r\n\r\n", 1)[1]
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return True


async def test_answers_come_back_whole_over_one_kept_alive_connection() -> None:
    up = client()
    async with peer(echo) as p:
        for n in range(3):
            body = b'{"n": %d}' % n
            reply = await up.post(p.address, "/predict", body, {"X-Request-Id": f"r{n}"})
            assert (reply.status, reply.body, reply.content_type) == (
                200,
                body,
                "application/json",
            )
        assert p.connections == 1 and len(p.requests) == 3
        first = p.requests[0]
        assert first.startswith(b"POST /predict HTTP/1.1\r\n")
        assert b"\r\nX-Request-Id: r0\r\n" in first and b"\r\nContent-Length: 8\r\n" in first
        got = await up.request("GET", p.address, "/v2/models/m", b"", {})
        assert got.status == 200 and got.body == b""
        assert p.requests[-1].startswith(b"GET /v2/models/m HTTP/1.1\r\n")
        assert b"Content-Length" not in p.requests[-1]
    await up.close()


async def test_chunked_and_until_close_answers_are_read() -> None:
    async def chunked(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: text/plain\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
        )
        return True

    async def until_close(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        return False

    up = client()
    async with peer(chunked) as p:
        for _ in range(2):
            reply = await up.post(p.address, "/x", b"{}", {})
            assert (reply.status, reply.body, reply.content_type) == (
                201,
                b"hello world",
                "text/plain",
            )
        assert p.connections == 1
    async with peer(until_close) as p:
        for _ in range(2):
            reply = await up.post(p.address, "/x", b"{}", {})
            assert reply.body == b"all of it"
        assert p.connections == 2  # an answer ending with the connection: never reused
    await up.close()


async def test_connection_close_is_honoured_and_a_stale_pooled_connection_is_replaced() -> None:
    async def close_after(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        return False

    up = client()
    async with peer(close_after) as p:
        for _ in range(3):
            assert (await up.post(p.address, "/x", b"{}", {})).body == b"ok"
        assert p.connections == 3

    # The server hangs up an idle kept-alive connection (its keep-alive timeout): the
    # next request notices before sending and opens a new one.
    hang_up_idle = asyncio.Event()

    async def answer_then_drop(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await echo(request, writer)
        await writer.drain()
        hang_up_idle.set()
        return False

    async with peer(answer_then_drop) as p:
        assert (await up.post(p.address, "/x", b"1", {})).body == b"1"
        await hang_up_idle.wait()
        pool = up._pools[p.address]
        await wait_for(lambda: pool.idle and pool.idle[0].closed, message="FIN not seen")
        assert (await up.post(p.address, "/x", b"2", {})).body == b"2"
        assert p.connections == 2
    await up.close()


async def test_refused_connection_is_connect_failed_so_the_handler_may_retry() -> None:
    up = client()
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConnectFailed) as refused:
        await up.post(address, "/predict", b"{}", {})
    assert refused.value.address == address
    # The slot was given back: the pool is not leaking its cap on failures.
    assert up._pools[address].open == 0
    await up.close()


async def test_hang_up_after_the_request_is_bad_gateway_not_a_retry() -> None:
    async def hang_up(request: bytes, writer: asyncio.StreamWriter) -> bool:
        return False

    async def garbage(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SMTP ready\r\n\r\n")
        return True

    up = client()
    for behaviour in (hang_up, garbage):
        async with peer(behaviour) as p:
            with pytest.raises(BadGateway) as broken:
                await up.post(p.address, "/predict", b"{}", {})
            assert "may have reached the model" in broken.value.message
            assert len(p.requests) == 1
            assert up._pools[p.address].open == 0
    await up.close()


async def test_a_model_that_does_not_answer_in_time_is_a_timeout() -> None:
    release = asyncio.Event()

    async def hang(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        return False

    up = client(timeout_seconds=0.3)
    async with peer(hang) as p:
        with pytest.raises(UpstreamTimeout) as late:
            await up.post(p.address, "/predict", b"{}", {})
        assert "0.3s" in late.value.message
        assert up._pools[p.address].open == 0  # the late connection is dropped
        release.set()
    await up.close()


async def test_the_per_host_cap_queues_requests_on_the_connections_it_allows() -> None:
    gate = asyncio.Event()

    async def slow_echo(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await gate.wait()
        return await echo(request, writer)

    up = client(connections_per_host=2)
    async with peer(slow_echo) as p:
        calls = [
            asyncio.ensure_future(up.post(p.address, "/x", str(n).encode(), {})) for n in range(6)
        ]
        await wait_for(lambda: len(p.requests) == 2, message="two requests in")
        assert (p.connections, len(p.requests)) == (2, 2)
        gate.set()
        replies = await asyncio.gather(*calls)
        assert sorted(r.body for r in replies) == [str(n).encode() for n in range(6)]
        assert p.connections == 2
    await up.close()


async def test_a_cancelled_request_drops_its_connection() -> None:
    started = asyncio.Event()

    async def hang(request: bytes, writer: asyncio.StreamWriter) -> bool:
        started.set()
        await asyncio.sleep(3600)
        return False

    up = client()
    async with peer(hang) as p:
        call = asyncio.ensure_future(up.post(p.address, "/x", b"{}", {}))
        await started.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert up._pools[p.address].open == 0 and not up._pools[p.address].idle
    await up.close()
