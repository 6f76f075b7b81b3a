"""The web console: a static single-page application the gateway serves at ``/console/``.

It has no server side of its own. The page runs in the browser and talks to what every
other client uses, with the signed-in user's token: the REST facade (``/api/v1``) for the
control plane and the data plane's routes for its API test. So the console can do
nothing a user's token cannot do through curl, and group confinement stays in the
services (decision 0036).

The files are plain HTML, CSS and JavaScript (no build step, no third-party code), read
once when the gateway starts and served with a Content-Security-Policy that allows only
the console's own script and style and requests back to this origin: a deployment's
description, readme or log line is shown as text, never run.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["CONSOLE_PATH", "SECURITY_HEADERS", "mount_console"]

CONSOLE_PATH = "/console/"
"""Where the console lives; ``/`` and ``/console`` redirect here."""

STATIC_DIR = Path(__file__).with_name("static")
"""The console's files."""

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

SECURITY_HEADERS = {
    # Only the console's own files run; data from the API is never markup.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A gateway upgrade must reach open browsers at their next load; the files are small.
    "Cache-Control": "no-cache",
}
"""Headers on every console file."""


def _load(directory: Path) -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(directory.iterdir()):
        content_type = _TYPES.get(path.suffix)
        if path.is_file() and content_type:
            files[path.name] = (path.read_bytes(), content_type)
    if "index.html" not in files:
        raise RuntimeError(f"the console's index.html is missing from {directory}")
    return files


def mount_console(app: web.Application, directory: Path = STATIC_DIR) -> None:
    """Adds ``GET /console/`` (the page), ``GET /console/{file}`` (its script and style)
    and redirects from ``/`` and ``/console`` to ``app`` (before it starts)."""
    files = _load(directory)

    def answer(name: str) -> web.Response:
        body, content_type = files[name]
        return web.Response(body=body, headers={"Content-Type": content_type, **SECURITY_HEADERS})

    async def index(request: web.Request) -> web.Response:
        return answer("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in files:
            raise web.HTTPNotFound(text=f"the console has no file {name!r}\n")
        return answer(name)

    async def to_console(request: web.Request) -> web.Response:
        raise web.HTTPFound(CONSOLE_PATH)

    app.router.add_get("/", to_console)
    app.router.add_get("/console", to_console)
    app.router.add_get(CONSOLE_PATH, index)
    app.router.add_get(CONSOLE_PATH + "{file}", asset)
