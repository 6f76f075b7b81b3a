"""Build logs into LOGS and the logging service, on real PostgreSQL and NATS: a real
build's log arrives complete and in order; a writer killed (SIGKILL) or closed while
LOGS is away is made good later, every line kept once; other groups get NOT_FOUND."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest

from shipyard.client import Client
from shipyard.client.config import ClientConfig
from shipyard.imagebuild.v1 import imagebuild_pb2 as ib
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc as ib_grpc
from shipyard.logging.v1 import logging_pb2 as lg
from shipyard.logging.v1 import logging_pb2_grpc as lg_grpc
from shipyard_core import bus, db
from shipyard_core.auth import Principal
from shipyard_core.embedded import free_port
from shipyard_core.logbatch import JetStreamLogPublisher, LogBatch
from shipyard_imagebuild.app import buildlogs
from shipyard_imagebuild.app.buildlogs import BuildLogWriter, last_seq, ship_leftovers
from shipyard_imagebuild.main import build
from shipyard_imagebuild.settings import ImageBuildSettings
from shipyard_logging.main import LoggingService, build_service
from shipyard_logging.settings import LoggingSettings
from shipyard_testing import StaticAuthenticator, folder_tar, wait_for

TOKENS = {
    "ana": Principal("ana", False, frozenset({"team-a"})),
    "bob": Principal("bob", False, frozenset({"team-b"})),
    "admin": Principal("root", True, frozenset()),
}
BUILD = "b-00112233445566ff"

# A cheap build (no requirements): load() prints 1500 lines, some not ASCII, one longer
# than imagebuild keeps (8192 characters), to stderr, which is the build's log.
CHATTY = {
    "serve.py": "import sys\n\n"
    "def load(model_dir):\n"
    "    for i in range(1500):\n"
    "        print(f'loading shard {i} caf\\u00e9 \\u2615', file=sys.stderr)\n"
    "    print('x' * 9000, file=sys.stderr)\n"
    "    return None\n\n"
    "def predict(model, payload):\n"
    "    return payload\n",
    "shipyard.yaml": "example_input: [1]\n",
}


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def logging_service(database_url: str, nats_url: str) -> AsyncIterator[LoggingService]:
    settings = LoggingSettings(
        database_url=database_url,
        nats_url=nats_url,
        grpc_port=0,
        log_json=False,
        shutdown_grace_seconds=1,
        follow_poll_seconds=0.05,
        ingest_ack_wait_seconds=2,
        gap_wait_seconds=3,
    )
    service = await build_service(settings, StaticAuthenticator(TOKENS))
    async with service.host:
        yield service


@dataclass
class Infra:
    pool: asyncpg.Pool
    js: object
    publisher: JetStreamLogPublisher


@pytest.fixture
async def infra(database_url: str, nats_url: str) -> AsyncIterator[Infra]:
    """imagebuild's log tables and a JetStream publisher, without the service."""
    pool = await db.create_pool(database_url)
    nc = await bus.connect(nats_url, "imagebuild-under-test")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    async with pool.acquire() as conn:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS imagebuild")
        await buildlogs.ensure_table(conn)
    try:
        yield Infra(pool, js, JetStreamLogPublisher(js))
    finally:
        await nc.close()
        await pool.close()


async def stored_here(pool: asyncpg.Pool, build_id: str) -> list[tuple[int, str]]:
    rows = await pool.fetch(
        "SELECT seq, line FROM imagebuild.build_logs WHERE build_id = $1 ORDER BY seq", build_id
    )
    return [(r["seq"], r["line"]) for r in rows]


async def stored_there(service: LoggingService, build_id: str) -> list[tuple[int, str]]:
    rows = await service.svc.pool.fetch(
        "SELECT \"offset\", text FROM logging.lines WHERE source = $1 AND kind = 'build' "
        'ORDER BY "offset"',
        build_id,
    )
    return [(r["offset"], r["text"]) for r in rows]


async def arrived(service: LoggingService, pool: asyncpg.Pool, build_id: str) -> bool:
    """Whether the logging service holds as many lines as imagebuild stored."""
    here = await stored_here(pool, build_id)
    return bool(here) and len(await stored_there(service, build_id)) >= len(here)


async def download(stub: lg_grpc.LogServiceStub, token: str, build_id: str) -> list[lg.LogLine]:
    request = lg.DownloadLogsRequest(build_id=build_id)
    return [
        line
        async for chunk in stub.DownloadLogs(request, metadata=_md(token))
        for line in chunk.lines
    ]


async def test_a_real_builds_log_reaches_the_logging_service_complete_and_in_order(
    database_url: str, nats_url: str, tmp_path: Path, logging_service: LoggingService
) -> None:
    settings = ImageBuildSettings(
        database_url=database_url, nats_url=nats_url, grpc_port=0, data_dir=tmp_path
    )
    host = await build(settings, StaticAuthenticator(TOKENS), ack_wait=3.0)
    async with (
        host,
        grpc.aio.insecure_channel(host.address) as ib_channel,
        grpc.aio.insecure_channel(logging_service.host.address) as lg_channel,
    ):
        images = ib_grpc.ImageBuildServiceStub(ib_channel)
        logs = lg_grpc.LogServiceStub(lg_channel)
        data = folder_tar(CHATTY)

        async def parts() -> AsyncIterator[ib.StartBuildRequest]:
            yield ib.StartBuildRequest(header=ib.StartBuildHeader(name="chatty"))
            yield ib.StartBuildRequest(chunk=data)

        started = await images.StartBuild(parts(), metadata=_md("ana"))
        build_id = started.build_id

        async def finished() -> ib.Build | None:
            b = await images.GetBuild(ib.GetBuildRequest(build_id=build_id), metadata=_md("ana"))
            return b if b.state in (ib.BUILD_STATE_SUCCEEDED, ib.BUILD_STATE_FAILED) else None

        done = await wait_for(finished, timeout=240, interval=0.2, message="no end")
        assert done.state == ib.BUILD_STATE_SUCCEEDED, done.reason + done.log_tail
        own = [
            line
            async for line in images.StreamBuildLogs(
                ib.StreamBuildLogsRequest(build_id=build_id), metadata=_md("ana")
            )
        ]
        assert len(own) > 1500

        pool = logging_service.svc.pool  # the same database as imagebuild's
        await wait_for(
            lambda: arrived(logging_service, pool, build_id), timeout=30, message="not arrived"
        )
        got = await download(logs, "ana", build_id)
        # Every line, once, in order, with its number, text and time.
        assert [(ln.offset, ln.text) for ln in got] == [(ln.seq, ln.line) for ln in own]
        assert [ln.at.ToMicroseconds() for ln in got] == [ln.at.ToMicroseconds() for ln in own]
        assert any("café ☕" in ln.text for ln in got)
        assert max(len(ln.text) for ln in got) == 8192  # as imagebuild cut it
        assert {ln.build_id for ln in got} == {build_id}
        tail = [
            ln
            async for chunk in logs.TailLogs(
                lg.TailLogsRequest(filter=lg.LogFilter(build_id=build_id, grep="SHARD 149")),
                metadata=_md("ana"),
            )
            for ln in chunk.lines
        ]
        assert tail[0].text == "loading shard 149 café ☕" and len(tail) == 11

        # Another group's member: NOT_FOUND, worded like a build that does not exist.
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await download(logs, "bob", build_id)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        assert hidden.value.details() == (
            f"build {build_id} does not exist; see `shipyard image builds`"
        )
        assert len(await download(logs, "admin", build_id)) == len(own)

        # The Python client (and so `shipyard image logs`), by image: the last lines from
        # the logging service, the whole log from imagebuild, the same without logging.
        def client_reads(logging_address: str) -> tuple[list[str], list[str]]:
            config = ClientConfig(
                endpoints={"imagebuild": host.address, "logging": logging_address}
            )
            with Client(token="ana", config=config) as client:
                last = [ln.line for ln in client.logs.build_log("chatty:1", tail=5)]
                whole = [ln.line for ln in client.logs.build_log("chatty")]
            return last, whole

        texts = [ln.line for ln in own]
        assert await asyncio.to_thread(client_reads, logging_service.host.address) == (
            texts[-5:],
            texts,
        )
        assert await asyncio.to_thread(client_reads, f"127.0.0.1:{free_port()}") == (
            texts[-5:],
            texts,
        )

        shipping = await pool.fetchrow(
            "SELECT group_name, image, stored, position FROM imagebuild.build_log_shipping "
            "WHERE build_id = $1",
            build_id,
        )
        assert dict(shipping) == {
            "group_name": "team-a",
            "image": "chatty",
            "stored": own[-1].seq,
            "position": own[-1].seq + 1,
        }


# A builder's log writer in a process of its own, killed mid-publish: it stores lines
# every 10 ms and publishes them through a publisher that lingers after each ack (the
# test kills it between "JetStream has it" and "the position is saved").
WRITER = r"""
import asyncio, sys
from shipyard_core import bus, db
from shipyard_core.logbatch import JetStreamLogPublisher
from shipyard_imagebuild.app.buildlogs import BuildLogWriter

class Lingering(JetStreamLogPublisher):
    async def publish(self, batch):
        await super().publish(batch)
        await asyncio.sleep(0.02)

async def main(dsn, nats_url, build_id):
    pool = await db.create_pool(dsn)
    nc = await bus.connect(nats_url, "writer")
    writer = BuildLogWriter(
        pool, build_id, interval=0.01, publisher=Lingering(nc.jetstream()),
        group="team-a", image="iris",
    )
    await writer.start()
    for i in range(100_000):
        writer.write(f"attempt 1 line {i}")
        if i % 50 == 0:
            await asyncio.sleep(0.005)
    await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_writer_killed_mid_publish_is_made_good_by_the_next_attempt(
    database_url: str, nats_url: str, infra: Infra, logging_service: LoggingService
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, database_url, nats_url, BUILD
    )
    try:

        async def frozen_at_the_worst_moment() -> bool:
            """Stops the writer; True (and it stays stopped) when the logging service
            already has lines past the position the writer saved, and lines are stored
            that LOGS does not have."""
            os.kill(proc.pid, signal.SIGSTOP)
            row = await infra.pool.fetchrow(
                "SELECT s.stored, s.position, l.next_offset FROM imagebuild.build_log_shipping s "
                "LEFT JOIN logging.sources l ON l.source = s.build_id WHERE s.build_id = $1",
                BUILD,
            )
            if (
                row is not None
                and row["next_offset"] is not None
                and row["stored"] >= row["next_offset"] > row["position"] > 0
            ):
                return True
            os.kill(proc.pid, signal.SIGCONT)
            return False

        await wait_for(frozen_at_the_worst_moment, timeout=60, interval=0.005, message="never")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    killed_at = await infra.pool.fetchrow(
        "SELECT stored, position FROM imagebuild.build_log_shipping WHERE build_id = $1", BUILD
    )
    assert killed_at["stored"] == await last_seq(infra.pool, BUILD)
    assert killed_at["position"] <= killed_at["stored"]  # stored, not (known) in LOGS

    # The next attempt of the build, as the builder starts it: after the stored lines.
    writer = BuildLogWriter(
        infra.pool, BUILD, publisher=infra.publisher, group="team-a", image="iris"
    )
    await writer.start(await last_seq(infra.pool, BUILD))
    assert writer.shipper is not None
    writer.write("attempt 2 starts")
    await writer.close()
    assert writer.shipper.published >= killed_at["stored"] - killed_at["position"] + 1

    here = await stored_here(infra.pool, BUILD)
    assert here[-1] == (killed_at["stored"] + 1, "attempt 2 starts")
    await wait_for(
        lambda: arrived(logging_service, infra.pool, BUILD), timeout=30, message="not arrived"
    )
    # Each line once (the logging service stores an offset at most once), all of them.
    assert await stored_there(logging_service, BUILD) == here
    stats = logging_service.ingester.stats
    # Lines LOGS had (the saved position lagged) came again, and were skipped.
    assert stats.duplicates > 0 and stats.gaps == 0


class Away:
    """A publisher for a LOGS that does not answer (while ``down``), else JetStream."""

    def __init__(self, real: JetStreamLogPublisher, ok_batches: int = 0) -> None:
        self.real = real
        self.ok_batches = ok_batches
        self.down = True

    async def publish(self, batch: LogBatch) -> None:
        if self.down and self.ok_batches <= 0:
            raise TimeoutError("nats: timeout")
        self.ok_batches -= 1
        await self.real.publish(batch)


async def test_lines_left_behind_at_close_are_shipped_later_once(
    infra: Infra, logging_service: LoggingService
) -> None:
    away = Away(infra.publisher, ok_batches=1)
    writer = BuildLogWriter(
        infra.pool, BUILD, interval=0.01, publisher=away, group="team-a", image="iris"
    )
    await writer.start()
    for i in range(3000):
        writer.write(f"line {i} " + "y" * 100)
        if i == 1000:
            await writer.flush()  # one batch gets through, then LOGS is away
    await writer.close()  # the build ends while LOGS is away: nothing lost here
    assert len(await stored_here(infra.pool, BUILD)) == 3000
    assert writer.shipper is not None and 0 < writer.shipper.published < 3000

    # A builder's leftover shipper does not touch a build whose lines are fresh...
    assert await ship_leftovers(infra.pool, infra.publisher, idle_seconds=30) == 0
    # ...and publishes the rest of a build whose writer is gone.
    left = 3000 - writer.shipper.published
    assert await ship_leftovers(infra.pool, infra.publisher, idle_seconds=0) == left
    assert await ship_leftovers(infra.pool, infra.publisher, idle_seconds=0) == 0
    await wait_for(
        lambda: arrived(logging_service, infra.pool, BUILD), timeout=30, message="not arrived"
    )
    assert await stored_there(logging_service, BUILD) == await stored_here(infra.pool, BUILD)
    assert logging_service.ingester.stats.gaps == 0
