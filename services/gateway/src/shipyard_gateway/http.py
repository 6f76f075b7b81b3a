"""The REST transport: an aiohttp application over the transport-neutral handler.

Routes:

- ``POST /deployments/{deployment}/predict``: raw JSON, the body is ``predict()``'s
  payload; the model server's answer comes back unchanged (status, body, content type)
  with ``X-Request-Id``.
- ``GET /v2/health/live``: ``{"live": true}`` while the process serves.
- ``GET /v2/health/ready``: ``{"ready": true}`` once the routing table was loaded from the
  scheduler, else 503.

This layer stays thin: it reads the request, calls the handler, writes the answer. Every
error is JSON ``{"error": "<message>"}`` with the status of THE table
(:data:`shipyard_gateway.errors.HTTP_STATUS`); a bug is a 500 with a generic message and
a reference id whose traceback is in the log; no stack trace ever reaches a caller.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from shipyard_core.errors import Unauthenticated
from shipyard_gateway.errors import PayloadTooLarge, http_status_for_exception
from shipyard_gateway.handler import PredictHandler
from shipyard_gateway.routing import RoutingTable

__all__ = ["PREDICT_ROUTE", "create_app"]

log = logging.getLogger(__name__)

PREDICT_ROUTE = "/deployments/{deployment}/predict"
"""The raw JSON prediction path (``Deployment.endpoint`` in the scheduler's API)."""

_ROUTES_HINT = f"the gateway serves POST {PREDICT_ROUTE} and GET /v2/health/live|ready"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The JSON error every failure is answered with."""
    return web.json_response({"error": message}, status=status, headers=headers)


def _size(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} bytes"


def _http_exception_message(request: web.Request, exc: web.HTTPException) -> str:
    # aiohttp's own refusals (no route, wrong method, oversized body) carry plain-text
    # reasons; say what to do instead.
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}; {_ROUTES_HINT}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} is not allowed on {request.path}; use {allowed}"
    return exc.reason or f"HTTP {exc.status}"


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns every exception into a JSON error (the one place the table is consulted)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, _http_exception_message(request, exc), headers)
    except Exception as exc:
        status, message = http_status_for_exception(exc, where=f"{request.method} {request.path}")
        headers = None
        if isinstance(exc, Unauthenticated):
            headers = {"WWW-Authenticate": 'Bearer realm="shipyard"'}
        return error_response(status, message, headers)


class _Api:
    """The route handlers; each one reads, delegates, writes."""

    def __init__(self, handler: PredictHandler, table: RoutingTable, max_body_bytes: int) -> None:
        self.handler = handler
        self.table = table
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than the gateway's limit of {_size(self.max_body_bytes)} "
            f"({self.max_body_bytes} bytes); send a smaller request, or split it"
        )

    async def predict(self, request: web.Request) -> web.Response:
        """``POST /deployments/{deployment}/predict``."""
        # Refused from the header when it tells, before a byte of the body is read.
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise self._too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            # A chunked body that outgrew client_max_size while being read.
            raise self._too_large() from None
        reply = await self.handler.predict(request.match_info["deployment"], body, request.headers)
        return web.Response(
            status=reply.status,
            body=reply.body,
            headers={"Content-Type": reply.content_type, "X-Request-Id": reply.request_id},
        )

    async def live(self, request: web.Request) -> web.Response:
        """``GET /v2/health/live``."""
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        """``GET /v2/health/ready``: ready once the routing table is loaded."""
        if self.table.synced:
            return web.json_response({"ready": True})
        return web.json_response(
            {"ready": False, "error": "the routing table is not loaded from the scheduler yet"},
            status=503,
        )


def create_app(
    handler: PredictHandler, table: RoutingTable, *, max_body_bytes: int
) -> web.Application:
    """The gateway's aiohttp application (serve it with an ``AppRunner``)."""
    # client_max_size also bounds chunked bodies, which carry no Content-Length.
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors])
    api = _Api(handler, table, max_body_bytes)
    app.router.add_post(PREDICT_ROUTE, api.predict)
    app.router.add_get("/v2/health/live", api.live)
    app.router.add_get("/v2/health/ready", api.ready)
    return app
