"""The builder: takes queued builds from JetStream and turns them into image versions.

Each ``BuildQueued`` event is a unit of work on a durable consumer whose
``max_ack_pending`` is the concurrency limit. While a build runs, the message is kept
alive with in-progress acks; if the builder dies, JetStream redelivers it after
``ack_wait`` and the build is resumed (redone from its stored source) as attempt n+1,
up to ``max_attempts``, after which it is failed explicitly. A build is never left
``building`` forever.

What a build makes is its backend's business (``app/backends.py``): an environment pack
built here, or an OCI image built by a Kaniko Job on a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from pathlib import Path

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import FetchTimeoutError, NotFoundError

from shipyard_core.aggregate import Repository, retry_on_conflict
from shipyard_core.bus import EVENTS_STREAM
from shipyard_core.errors import ShipyardError
from shipyard_core.eventstore import EventStore, StoredEvent
from shipyard_core.logbatch import JetStreamLogPublisher
from shipyard_imagebuild.app.backends import BuildBackend, BuildTask
from shipyard_imagebuild.app.buildlogs import BuildLogWriter, last_seq, ship_leftovers_until
from shipyard_imagebuild.domain import IMAGEBUILD_EVENTS, Build, ImageRepo
from shipyard_imagebuild.domain.events import BuildQueued, ImageVersionCreated
from shipyard_imagebuild.projections import SCHEMA

log = logging.getLogger(__name__)

DURABLE = "imagebuild_builder"


class Builder:
    """Runs queued builds, ``concurrency`` at a time."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: EventStore,
        js: JetStreamContext,
        backend: BuildBackend,
        *,
        work_dir: Path,
        concurrency: int = 2,
        max_attempts: int = 3,
        ack_wait: float = 60.0,
    ) -> None:
        self.pool = pool
        self.store = store
        self.js = js
        self.backend = backend
        self.work_dir = work_dir
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.ack_wait = ack_wait
        self.builds = Repository(store, Build, IMAGEBUILD_EVENTS)
        self.repos = Repository(store, ImageRepo, IMAGEBUILD_EVENTS)
        self.running: set[asyncio.Task[None]] = set()
        # Build log lines go to LOGS too, for the logging service (app/buildlogs.py).
        self.log_publisher = JetStreamLogPublisher(js)

    async def ensure_consumer(self) -> None:
        """The durable work consumer over build events."""
        try:
            await self.js.consumer_info(EVENTS_STREAM, DURABLE)
        except NotFoundError:
            await self.js.add_consumer(
                EVENTS_STREAM,
                ConsumerConfig(
                    durable_name=DURABLE,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=self.ack_wait,
                    max_deliver=-1,  # attempts are bounded by the Build aggregate
                    max_ack_pending=self.concurrency,
                    filter_subject=f"events.{SCHEMA}.build.*",
                ),
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Takes work until ``stop``; running builds are cancelled and will be redelivered."""
        await self.ensure_consumer()
        sub = await self.js.pull_subscribe_bind(DURABLE, stream=EVENTS_STREAM)
        slots = asyncio.Semaphore(self.concurrency)
        leftovers = asyncio.create_task(ship_leftovers_until(self.pool, self.log_publisher, stop))
        try:
            while not stop.is_set():
                await slots.acquire()
                try:
                    msgs = await sub.fetch(1, timeout=1.0)
                except (TimeoutError, FetchTimeoutError):
                    slots.release()
                    continue
                task = asyncio.create_task(self._handle(msgs[0]))
                self.running.add(task)

                def done(t: asyncio.Task[None]) -> None:
                    self.running.discard(t)
                    slots.release()

                task.add_done_callback(done)
        finally:
            leftovers.cancel()
            for task in list(self.running):
                task.cancel()
            for task in [leftovers, *self.running]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _handle(self, msg: Msg) -> None:
        try:
            event = StoredEvent.decode(msg.data)
        except ValueError:
            log.error("builder got an undecodable message; dropping it")
            await msg.term()
            return
        if event.event_type != "BuildQueued":
            await msg.ack()
            return
        heartbeat = asyncio.create_task(self._keep_alive(msg))
        try:
            await self.build(event.aggregate_id)
        finally:
            heartbeat.cancel()
        await msg.ack()

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.ack_wait / 3)  # renew well before ack_wait runs out
            await msg.in_progress()

    async def build(self, build_id: str) -> None:
        """Runs one build to its end (or does nothing if it has ended)."""
        build = await self.builds.load(build_id)
        if build.finished or build.request is None:
            return
        if build.attempts >= self.max_attempts:
            build.fail(
                f"the build was interrupted {build.attempts} times (the builder restarted "
                "during it); start it again with `shipyard image build`",
                "interrupted",
            )
            await self.builds.save(build)
            # What the last attempt left running (a cluster build's Job) goes too.
            logs = self._log_writer(build_id, build.request)
            await logs.start(await last_seq(self.pool, build_id))
            work = self.work_dir / f"{build_id}-{build.attempts}"
            await self._cleanup(BuildTask(build.request, build.attempts, work, logs))
            await logs.close()
            return
        attempt = build.start()
        await self.builds.save(build)
        request = build.request
        logs = self._log_writer(build_id, request)
        await logs.start(await last_seq(self.pool, build_id))
        logs.write(f"build {build_id} attempt {attempt}: {request.group}/{request.name}")
        work = self.work_dir / f"{build_id}-{attempt}"
        task = BuildTask(request, attempt, work, logs)
        started = time.monotonic()
        ended = True  # False when the builder stops mid-build: the build will be resumed
        try:
            created = await self.backend.make(task)
            await self._succeed(build_id, request, created, time.monotonic() - started)
            logs.write(f"succeeded in {time.monotonic() - started:.1f}s")
        except ShipyardError as exc:
            logs.write(f"failed: {exc.message}")
            await self._fail(build_id, exc.message, "build", logs.tail())
        except asyncio.CancelledError:
            ended = False
            logs.write("interrupted: the builder is stopping; the build will be resumed")
            raise
        except Exception:
            reference = uuid.uuid4().hex[:12]
            log.exception("build %s failed unexpectedly (reference %s)", build_id, reference)
            logs.write(f"internal error (reference {reference})")
            await self._fail(
                build_id,
                f"internal error during the build; see the imagebuild log, reference {reference}",
                "internal",
                logs.tail(),
            )
        finally:
            if ended:
                await self._cleanup(task)
            await logs.close()
            await asyncio.to_thread(shutil.rmtree, work, True)

    def _log_writer(self, build_id: str, request: BuildQueued) -> BuildLogWriter:
        return BuildLogWriter(
            self.pool,
            build_id,
            publisher=self.log_publisher,
            group=request.group,
            image=request.name,
        )

    async def _cleanup(self, task: BuildTask) -> None:
        try:
            await self.backend.cleanup(task)
        except Exception:
            log.exception("cleaning up after build %s failed", task.request.build_id)

    async def _succeed(
        self, build_id: str, request: BuildQueued, created: ImageVersionCreated, seconds: float
    ) -> None:
        async def command() -> None:
            build = await self.builds.load(build_id)
            if build.finished:
                return
            repo = await self.repos.load(f"{request.group}/{request.name}")
            version = repo.add_version(created)
            build.succeed(version, created.digest, created.size_bytes, False, seconds)
            # The image version first: the catalog projection applies events in order, so
            # whoever sees the build succeeded can already use its image.
            await self.builds.save(repo, build, actor=request.requested_by)

        await retry_on_conflict(command)

    async def _fail(self, build_id: str, reason: str, stage: str, tail: str) -> None:
        async def command() -> None:
            build = await self.builds.load(build_id)
            build.fail(reason, stage, tail)
            await self.builds.save(build)

        await retry_on_conflict(command)
