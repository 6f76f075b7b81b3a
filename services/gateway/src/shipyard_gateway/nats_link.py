"""The gateway's one NATS connection, shared by its telemetry (load reports, metrics).

Predictions never wait for NATS: the connection is made in the background, retried
forever (the broker may start after the gateway, or restart), and an outage is logged
once, not once per reconnect attempt.
"""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client as NATS

__all__ = ["NatsLink"]

log = logging.getLogger(__name__)


class NatsLink:
    """A NATS connection to ``url`` named ``name``, made by the first :meth:`connect`."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self._nc: NATS | None = None
        self._connecting: asyncio.Task[NATS] | None = None
        self._outage = False

    @property
    def nc(self) -> NATS | None:
        """The connection once made (it reconnects by itself), else None."""
        return self._nc

    async def _on_error(self, error: Exception) -> None:
        # nats-py logs a traceback per failed attempt (four a second) by default; one line
        # per outage says the same.
        if not self._outage:
            self._outage = True
            log.warning("NATS at %s unreachable (%r); telemetry waits for it", self.url, error)

    async def _on_reconnected(self) -> None:
        if self._outage:
            self._outage = False
            log.info("NATS reachable again; telemetry resumes")

    async def connect(self, stop: asyncio.Event) -> NATS | None:
        """The connection, connecting first when needed (one attempt shared by every
        caller); None when ``stop`` is set before it is made."""
        if self._nc is not None:
            return self._nc
        if self._connecting is None:
            # The options of shipyard_core.bus.connect (retry forever), plus the quiet
            # callbacks.
            self._connecting = asyncio.ensure_future(
                nats.connect(
                    self.url,
                    name=self.name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    connect_timeout=5,
                    error_cb=self._on_error,
                    reconnected_cb=self._on_reconnected,
                )
            )
        connecting = self._connecting
        stopped = asyncio.ensure_future(stop.wait())
        try:
            # Racing `stop` keeps shutdown prompt while NATS is down.
            await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not connecting.done():
            return None
        if self._nc is None:
            self._nc = connecting.result()
            await self._on_reconnected()
        return self._nc

    async def close(self) -> None:
        """Flushes and closes the connection, or abandons the attempt to make it."""
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except Exception as exc:
                log.warning("closing the NATS connection failed: %r", exc)
