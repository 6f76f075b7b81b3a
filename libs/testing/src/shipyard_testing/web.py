"""A throwaway HTTP server for tests: an aiohttp application on a free loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

__all__ = ["serve_app"]


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, **runner_options: Any) -> AsyncIterator[int]:
    """Serves ``app`` on 127.0.0.1 at a free port until the block ends; yields the port.
    ``runner_options`` go to ``web.AppRunner`` (``access_log=None``, say)."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
