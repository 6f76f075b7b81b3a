"""Image prefetch for the local backend: a new image is unpacked before it is deployed.

A deployment's first instance otherwise waits for its image to be fetched and unpacked
(seconds for a scikit-learn pack) and then for its first imports to be compiled to
bytecode. Nodes of container platforms pre-pull images for the same reason. The
prefetcher listens to imagebuild's ``ImageVersionCreated`` events on the bus (a plain
subscription: an event missed while the scheduler is down only means that image is
unpacked on first use, as without prefetch) and hands each pack to
:meth:`LocalBackend.prefetch`, one at a time. After each, unpacked images no instance uses
are pruned beyond the ``keep`` most recently used (``image_cache_keep``), so building
many images does not fill the disk; the images of existing deployments (stopped or
scaled to zero ones included) are never pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shipyard_core.errors import ShipyardError
from shipyard_core.eventstore import StoredEvent
from shipyard_scheduler.adapters.local import LocalBackend

log = logging.getLogger(__name__)

IMAGE_EVENTS = "events.imagebuild.image.*"
"""Where imagebuild publishes the events of its ``image`` aggregate."""
_QUEUE_LIMIT = 64


@dataclass(frozen=True)
class PackToFetch:
    """One environment pack a new image version points to."""

    image: str
    digest: str
    pack_key: str


def pack_of(body: bytes) -> PackToFetch | None:
    """The pack an ``ImageVersionCreated`` envelope names, or None for any other event,
    a cluster (OCI) image, or a body that does not parse."""
    try:
        event = StoredEvent.decode(body)
        if event.event_type != "ImageVersionCreated":
            return None
        data = event.payload
        if data.get("kind", "pack") != "pack" or not data.get("pack_key"):
            return None
        name = event.aggregate_id.split("/", 1)[-1]  # ``<group>/<name>``
        return PackToFetch(f"{name}:{int(data['version'])}", str(data["digest"]), data["pack_key"])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


class ImagePrefetcher:
    """Feeds new images' packs to the local backend's prefetch."""

    def __init__(
        self,
        nc: NATS,
        backend: LocalBackend,
        keep: int = 8,
        protected: Callable[[], Awaitable[frozenset[str]]] | None = None,
    ) -> None:
        self.nc = nc
        self.backend = backend
        self.keep = keep
        self.protected = protected
        """The digests no pruning may remove (the images of every deployment)."""
        self.queue: asyncio.Queue[PackToFetch] = asyncio.Queue(_QUEUE_LIMIT)
        self.fetched = 0

    def _on_message(self, msg: Msg) -> None:
        pack = pack_of(msg.data)
        if pack is not None:
            with contextlib.suppress(asyncio.QueueFull):  # a burst of builds: skip some
                self.queue.put_nowait(pack)

    async def run(self, stop: asyncio.Event) -> None:
        """Subscribes and prefetches until ``stop``."""

        async def on_message(msg: Msg) -> None:
            self._on_message(msg)

        sub = await self.nc.subscribe(IMAGE_EVENTS, cb=on_message)
        worker = asyncio.create_task(self._work(), name="scheduler-prefetch")
        try:
            await stop.wait()
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _work(self) -> None:
        while True:
            pack = await self.queue.get()
            try:
                if await self.backend.prefetch(pack.image, pack.digest, pack.pack_key):
                    self.fetched += 1
                # Each prefetch adds an image: the oldest unused ones make room.
                protect = await self.protected() if self.protected else frozenset()
                pruned = await self.backend.prune_images(self.keep, protect)
                if pruned:
                    log.info("pruned %d unused unpacked images", len(pruned))
            except ShipyardError as exc:
                log.warning("prefetch of image %s: %s", pack.image, exc.message)
            except Exception:
                log.exception("prefetch of image %s failed", pack.image)
