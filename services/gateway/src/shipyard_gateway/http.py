"""The REST transport: an aiohttp application over the transport-neutral handler.

Routes (``{deployment}`` is the deployment's name, which is also its model's name):

Open Inference Protocol v2

- ``POST /v2/models/{deployment}/infer`` (also ``.../versions/{version}/infer``): the
  envelope of small bodies is checked (:mod:`shipyard_gateway.protocols`), then the body
  goes to the model server's own ``/v2/models/{deployment}/infer`` unchanged, and its
  answer (status, body) comes back unchanged.
- ``GET /v2/models/{deployment}`` (also ``.../versions/{version}``): the model server's
  metadata, with ``versions`` set to the deployment's active revision.
- ``GET /v2/models/{deployment}/ready`` (also ``.../versions/{version}/ready``): from the
  routing table, no model server involved: ``{"name", "ready": true}`` when an instance is
  ready, else 503 with ``"ready": false`` (a deployment scaled to zero is woken by the
  probe, so a later probe says ready).
- ``GET /v2/health/live``: ``{"live": true}`` while the process serves;
  ``GET /v2/health/ready``: ``{"ready": true}`` once the routing table was loaded from the
  scheduler, else 503; ``GET /v2``: ``{"name": "shipyard", "version", "extensions": []}``.

A ``{version}`` is the deployment's active revision (``shipyard deploy show``); another
one is 404.

KServe v1

- ``POST /v1/models/{deployment}:predict``: ``{"instances": [...]}`` →
  ``{"predictions": ...}`` (model server ``/v1/models/{deployment}:predict``).
- ``GET /v1/models/{deployment}``: ``{"name", "ready"}`` like the OIP readiness.

Seldon

- ``POST /deployment/{deployment}/api/v1.0/predictions``: ``{"data": {"names"?,
  "ndarray" | "tensor": {"shape", "values"}}}`` (model server ``/api/v1.0/predictions``).

Raw JSON

- ``POST /deployments/{deployment}/predict``: the body is ``predict()``'s payload, passed
  through unparsed; the model server's answer comes back unchanged.

Every forwarded answer carries ``X-Request-Id``. Errors of the gateway itself are in the
route's protocol shape (:func:`shipyard_gateway.protocols.error_body`: ``{"error": ...}``,
or Seldon's ``{"status": {"code", "info", "reason", "status": "FAILURE"}}``) with the
status of THE table (:data:`shipyard_gateway.errors.ERROR_STATUS`); 401 carries
``WWW-Authenticate``, 429 ``Retry-After``. A bug is a 500 with a generic message and a
reference id whose traceback is in the log; no stack trace ever reaches a caller.

This layer stays thin: it reads the request, calls the handler, writes the answer, and
records the request's outcome (:class:`~shipyard_gateway.metrics.MetricsRecorder`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from shipyard_core.errors import Unauthenticated
from shipyard_gateway.access import WWW_AUTHENTICATE
from shipyard_gateway.errors import (
    BadGateway,
    PayloadTooLarge,
    TooManyRequests,
    http_reason,
    http_status_for_exception,
)
from shipyard_gateway.handler import RAW_PREDICT_PATH, PredictHandler
from shipyard_gateway.metrics import MetricsRecorder
from shipyard_gateway.protocols import (
    RAW,
    SELDON,
    V1,
    V2,
    check_kserve_v1,
    check_oip,
    check_seldon,
    error_body,
)
from shipyard_gateway.routing import RoutingTable

__all__ = ["DATA_PLANE_HEADERS", "PREDICT_ROUTE", "SERVER_NAME", "create_app", "error_response"]

log = logging.getLogger(__name__)

PREDICT_ROUTE = "/deployments/{deployment}/predict"
"""The raw JSON prediction path (``Deployment.endpoint`` in the scheduler's API)."""

SERVER_NAME = "shipyard"
"""The ``name`` of the OIP server metadata (REST ``GET /v2`` and gRPC)."""

_SELDON_PATH = "/api/v1.0/predictions"
_SELDON_PREFIX = "/deployment/"

_ROUTES_HINT = (
    "the gateway serves POST /v2/models/{deployment}/infer, GET /v2/models/{deployment}[/ready], "
    "POST /v1/models/{deployment}:predict, GET /v1/models/{deployment}, "
    "POST /deployment/{deployment}/api/v1.0/predictions, POST /deployments/{deployment}/predict "
    "and GET /v2, /v2/health/live|ready"
)

# Seldon error answers of a model server above this size are passed on as they are
# rather than parsed to add the "reason" field.
_SELDON_ERROR_REWRITE_MAX = 64 * 1024

_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Check = Callable[[bytes], None]


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, protocol: str = V2
) -> web.Response:
    """The error answer of ``protocol`` (``{"error": message}`` unless Seldon)."""
    out = {"Content-Type": _JSON}
    if headers:
        out.update(headers)
    return web.Response(status=status, body=error_body(protocol, status, message), headers=out)


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
        return f"no such endpoint: {request.method} {request.path[:200]}; {_ROUTES_HINT}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} is not allowed on {request.path[:200]}; use {allowed}"
    return exc.reason or f"HTTP {exc.status}"


def _protocol_of_path(path: str) -> str:
    return SELDON if path.startswith(_SELDON_PREFIX) else V2


def _failure(exc: BaseException, request: web.Request, protocol: str) -> web.Response:
    """The answer to ``exc`` in ``protocol``'s shape (THE table decides the status)."""
    status, message = http_status_for_exception(exc, where=f"{request.method} {request.path}")
    headers: dict[str, str] | None = None
    if isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": WWW_AUTHENTICATE}
    elif isinstance(exc, TooManyRequests):
        headers = {"Retry-After": str(TooManyRequests.retry_after_seconds)}
    return error_response(status, message, headers, protocol)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path, wrong method) and anything a route let
    through, as JSON errors; the routes answer their own domain errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(
            exc.status,
            _http_exception_message(request, exc),
            headers,
            _protocol_of_path(request.path),
        )
    except Exception as exc:
        return _failure(exc, request, _protocol_of_path(request.path))


def _with_seldon_reason(body: bytes, status: int) -> bytes:
    """A model server's Seldon error with ``reason`` added when it lacks one (the
    gateway's own Seldon errors have it; callers see one shape whoever answered)."""
    if len(body) > _SELDON_ERROR_REWRITE_MAX:
        return body
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return body
    inner = document.get("status") if isinstance(document, dict) else None
    if not isinstance(inner, dict) or "reason" in inner:
        return body
    inner["reason"] = http_reason(status)
    return json.dumps(document, separators=(",", ":")).encode()


class _Api:
    """The route handlers; each one reads, delegates, writes, records."""

    def __init__(
        self,
        handler: PredictHandler,
        table: RoutingTable,
        metrics: MetricsRecorder,
        *,
        max_body_bytes: int,
        check_body_max_bytes: int,
        version: str,
    ) -> None:
        self.handler = handler
        self.table = table
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.check_body_max_bytes = check_body_max_bytes
        self._server_metadata = json.dumps(
            {"name": SERVER_NAME, "version": version, "extensions": []}
        ).encode()

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than the gateway's limit of {_size(self.max_body_bytes)} "
            f"({self.max_body_bytes} bytes); send a smaller request, or split it"
        )

    async def _body(self, request: web.Request) -> bytes:
        # Refused from the header when it tells, before a byte of the body is read.
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise self._too_large()
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            # A chunked body that outgrew client_max_size while being read.
            raise self._too_large() from None

    async def _forward(
        self, request: web.Request, protocol: str, path: str, check: Check | None
    ) -> web.Response:
        """Reads, checks (small bodies, when the protocol has a check), forwards to
        ``path`` of a ready instance, answers, records."""
        start = time.perf_counter()
        match = request.match_info
        deployment = match["deployment"]
        try:
            body = await self._body(request)
            if check is not None and len(body) <= self.check_body_max_bytes:
                check(body)
            reply = await self.handler.forward(
                deployment, path, body, request.headers, version=match.get("version", "")
            )
            status = reply.status
            payload = reply.body
            if protocol == SELDON and status >= 400:
                payload = _with_seldon_reason(payload, status)
            response = web.Response(
                status=status,
                body=payload,
                headers={"Content-Type": reply.content_type, "X-Request-Id": reply.request_id},
            )
        except Exception as exc:
            response = _failure(exc, request, protocol)
            status = response.status
        self.metrics.record(deployment, status, time.perf_counter() - start, protocol)
        return response

    # --- predictions -------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        """``POST /v2/models/{deployment}[/versions/{version}]/infer``."""
        path = f"/v2/models/{request.match_info['deployment']}/infer"
        return await self._forward(request, V2, path, check_oip)

    async def kserve_predict(self, request: web.Request) -> web.Response:
        """``POST /v1/models/{deployment}:predict``."""
        path = f"/v1/models/{request.match_info['deployment']}:predict"
        return await self._forward(request, V1, path, check_kserve_v1)

    async def seldon_predict(self, request: web.Request) -> web.Response:
        """``POST /deployment/{deployment}/api/v1.0/predictions``."""
        return await self._forward(request, SELDON, _SELDON_PATH, check_seldon)

    async def predict(self, request: web.Request) -> web.Response:
        """``POST /deployments/{deployment}/predict``: raw JSON, never parsed here."""
        return await self._forward(request, RAW, RAW_PREDICT_PATH, None)

    # --- model metadata and readiness ----------------------------------------------------

    async def model_metadata(self, request: web.Request) -> web.Response:
        """``GET /v2/models/{deployment}[/versions/{version}]``: the model server's answer,
        ``versions`` being the active revision."""
        start = time.perf_counter()
        deployment = request.match_info["deployment"]
        try:
            reply = await self.handler.forward(
                deployment,
                f"/v2/models/{deployment}",
                b"",
                request.headers,
                method="GET",
                version=request.match_info.get("version", ""),
            )
            body = reply.body
            route = self.table.get(deployment)
            if reply.status == 200 and route is not None:
                body = json.dumps(_with_versions(body, route.revision)).encode()
            response = web.Response(
                status=reply.status,
                body=body,
                headers={"Content-Type": reply.content_type, "X-Request-Id": reply.request_id},
            )
        except Exception as exc:
            response = _failure(exc, request, V2)
        self.metrics.record(deployment, response.status, time.perf_counter() - start, V2)
        return response

    async def _readiness(self, request: web.Request, protocol: str) -> web.Response:
        start = time.perf_counter()
        deployment = request.match_info["deployment"]
        try:
            route, _ = await self.handler.authorize(
                deployment, request.headers, version=request.match_info.get("version", "")
            )
            ready = route.ready and not route.stopped
            if not ready:
                self.handler.wake(deployment)
            response = web.json_response(
                {"name": deployment, "ready": ready}, status=200 if ready else 503
            )
        except Exception as exc:
            response = _failure(exc, request, protocol)
        self.metrics.record(deployment, response.status, time.perf_counter() - start, protocol)
        return response

    async def model_ready(self, request: web.Request) -> web.Response:
        """``GET /v2/models/{deployment}[/versions/{version}]/ready``."""
        return await self._readiness(request, V2)

    async def kserve_ready(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{deployment}``."""
        return await self._readiness(request, V1)

    # --- the server ----------------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        """``GET /v2``."""
        return web.Response(body=self._server_metadata, headers={"Content-Type": _JSON})

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


def _with_versions(body: bytes, revision: int) -> Any:
    """The model server's metadata document with ``versions`` = the active revision."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise BadGateway("the model server's metadata is not JSON") from None
    if not isinstance(document, dict):
        raise BadGateway("the model server's metadata is not a JSON object")
    document["versions"] = [str(revision)]
    return document


DATA_PLANE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}
"""On every answer that sets no policy of its own (all but the console's files): a model's
answer, whatever type it claims, never runs as a page on the console's origin."""


async def _never_a_page(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in DATA_PLANE_HEADERS.items():
        response.headers.setdefault(name, value)


def create_app(
    handler: PredictHandler,
    table: RoutingTable,
    metrics: MetricsRecorder,
    *,
    max_body_bytes: int,
    check_body_max_bytes: int,
    version: str,
) -> web.Application:
    """The gateway's aiohttp application (serve it with an ``AppRunner``)."""
    # client_max_size also bounds chunked bodies, which carry no Content-Length.
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors])
    app.on_response_prepare.append(_never_a_page)
    api = _Api(
        handler,
        table,
        metrics,
        max_body_bytes=max_body_bytes,
        check_body_max_bytes=check_body_max_bytes,
        version=version,
    )
    add_get, add_post = app.router.add_get, app.router.add_post
    add_post(PREDICT_ROUTE, api.predict)
    add_post("/v2/models/{deployment}/infer", api.infer)
    add_post("/v2/models/{deployment}/versions/{version}/infer", api.infer)
    add_get("/v2/models/{deployment}", api.model_metadata)
    add_get("/v2/models/{deployment}/versions/{version}", api.model_metadata)
    add_get("/v2/models/{deployment}/ready", api.model_ready)
    add_get("/v2/models/{deployment}/versions/{version}/ready", api.model_ready)
    # No colon in the name: `GET .../iris:predict` is then a 405 of the predict route, not
    # a readiness question about a deployment called "iris:predict".
    add_post("/v1/models/{deployment:[^{}/:]+}:predict", api.kserve_predict)
    add_get("/v1/models/{deployment:[^{}/:]+}", api.kserve_ready)
    add_post("/deployment/{deployment}/api/v1.0/predictions", api.seldon_predict)
    add_get("/v2", api.server_metadata)
    add_get("/v2/health/live", api.live)
    add_get("/v2/health/ready", api.ready)
    return app
