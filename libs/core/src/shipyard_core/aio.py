"""Small asyncio helpers shared by the kit's long-running loops."""

from __future__ import annotations

import asyncio
import contextlib


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Waits ``seconds``, or less if ``stop`` is set meanwhile (loops back off with it and
    still shut down at once)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def wait_either(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Waits until ``wake`` or ``stop`` is set, at most ``seconds`` (a loop that sleeps
    until woken still shuts down at once)."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
