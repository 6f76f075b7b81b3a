"""Routes and handlers: HTTP-free, so the protocol logic is testable without sockets.

The HTTP layer resolves a path to a :class:`Route` as soon as it has the request head (it
needs the route's error shape to refuse an oversized body before reading it), then calls
the handler for the method with the headers and the body. Handlers return
``(status, JSON bytes)`` and never raise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import unquote

from shipyard_runtime import __version__, batchwire, codec
from shipyard_runtime.codec import NotSerializableError, RequestError
from shipyard_runtime.model import LoadedModel, Manifest, describe_exception

log = logging.getLogger("shipyard_runtime")

Handler = Callable[[dict[str, str], bytes], tuple[int, bytes]]
ErrorBody = Callable[[int, str], bytes]

# predict() raising one of these is taken as the caller's bad input: 400, not 500.
CALLER_ERRORS = (ValueError, TypeError, KeyError, IndexError)


def simple_error(status: int, message: str) -> bytes:
    """The ``{"error": "..."}`` shape of OIP, KServe v1, raw JSON and unknown paths."""
    return codec.dumps({"error": message})


def seldon_error(status: int, message: str) -> bytes:
    """Seldon's error shape."""
    return codec.dumps({"status": {"code": status, "info": message, "status": "FAILURE"}})


@dataclass(frozen=True, slots=True)
class Prepared:
    """A prediction request decoded and waiting for its turn in a batch."""

    payload: Any
    """What ``predict()`` gets."""
    finish: Callable[[Any], bytes]
    """``predict()``'s result → the 200 answer's body (may raise NotSerializableError)."""
    headers: dict[str, str]
    request_id: str
    protocol: str
    error: ErrorBody
    parameters: dict[str, Any] | None = None
    """The OIP request's ``parameters`` (they reach ``predict()`` through its context)."""


Decode = Callable[[dict[str, str], bytes], Prepared]
"""A prediction route's first half: the request → :class:`Prepared` (raises RequestError)."""


@dataclass(frozen=True)
class Route:
    """What a path accepts: handlers by method, and how its errors look."""

    methods: dict[str, Handler]
    error: ErrorBody
    allow: str = ""
    decode: Decode | None = None
    """Set on prediction routes (POST) when the model can batch: the HTTP layer then
    decodes the request, collects it with the others that arrived in the same event-loop
    turn, and answers them all from one :meth:`App.run_batch`."""
    content_type: str | None = None
    """The content type of its 200 answers when not JSON (errors are JSON)."""


class _PredictFailed(Exception):
    """predict() failed for a reason that is not the caller's: 500 (already logged)."""


class _BatchContract(Exception):
    """predict_batch() answered something other than one result per payload."""


def _describe_results(results: Any) -> str:
    if isinstance(results, (list, tuple)):
        return f"{len(results)} results"
    return f"a {type(results).__name__}"


def _static(body: bytes) -> Handler:
    def handler(headers: dict[str, str], request_body: bytes) -> tuple[int, bytes]:
        return 200, body

    return handler


class App:
    """The model server's HTTP surface for one loaded model."""

    def __init__(
        self,
        model: LoadedModel,
        name: str,
        manifest: Manifest | None = None,
        workers: int = 1,
    ) -> None:
        self.model = model
        self.name = name
        manifest = manifest or Manifest()
        self.version = manifest.version
        self._predict = model.predict
        self._wants_context = model.wants_context
        self._predict_batch = model.predict_batch
        # predict_batch gets no per-request context, so a script that asks for one is
        # served request by request.
        batching = self._predict_batch is not None and not self._wants_context
        self._batch_warned = False

        inputs = manifest.inputs
        if inputs is None and manifest.has_example:
            try:
                inputs = codec.tensor_metadata(manifest.example_input, codec.DEFAULT_INPUT)
            except NotSerializableError:
                inputs = None
        metadata = {
            "name": name,
            "versions": [self.version] if self.version else [],
            "platform": "shipyard",
            "inputs": inputs or [],
            "outputs": manifest.outputs or [],
            "parameters": {
                "script": model.script.path.name,
                "has_predict_batch": model.has_predict_batch,
                "accepts_context": model.wants_context,
                "workers": workers,
            },
        }
        server_metadata = {"name": "shipyard-runtime", "version": __version__, "extensions": []}
        ready = codec.dumps({"name": name, "ready": True})
        # Set while the worker drains: load balancers stop sending before it exits.
        self.draining = False

        def readiness(ready_body: bytes, not_ready_body: bytes) -> dict[str, Handler]:
            def handler(headers: dict[str, str], request_body: bytes) -> tuple[int, bytes]:
                return (503, not_ready_body) if self.draining else (200, ready_body)

            return {"GET": handler}

        model_ready = readiness(ready, codec.dumps({"name": name, "ready": False}))

        def static_get(body: bytes) -> dict[str, Handler]:
            return {"GET": _static(body)}

        def predict_route(
            decode: Callable[[dict[str, str], bytes], Prepared], error: ErrorBody
        ) -> Route:
            def handler(headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
                return self._answer(lambda: self._single(decode(headers, body)), headers, error)

            return Route({"POST": handler}, error, "POST", decode if batching else None)

        model_routes = {
            "": Route(static_get(codec.dumps(metadata)), simple_error, "GET"),
            "/ready": Route(model_ready, simple_error, "GET"),
            "/infer": predict_route(self._decode_v2, simple_error),
        }
        routes: dict[str, Route] = {
            "/v2": Route(static_get(codec.dumps(server_metadata)), simple_error, "GET"),
            "/v2/health/live": Route(static_get(codec.dumps({"live": True})), simple_error, "GET"),
            "/v2/health/ready": Route(
                readiness(codec.dumps({"ready": True}), codec.dumps({"ready": False})),
                simple_error,
                "GET",
            ),
            f"/v1/models/{name}": Route(model_ready, simple_error, "GET"),
            f"/v1/models/{name}:predict": predict_route(self._decode_v1, simple_error),
            "/api/v1.0/predictions": predict_route(self._decode_seldon, seldon_error),
            "/predict": predict_route(self._decode_raw, simple_error),
        }
        for suffix, route in model_routes.items():
            routes[f"/v2/models/{name}{suffix}"] = route
            if self.version:
                routes[f"/v2/models/{name}/versions/{self.version}{suffix}"] = route
        # Several predictions in one exchange (the async workers' calls, decision 0035).
        self._batch_route = Route(
            {"POST": self._serve_batch},
            simple_error,
            "POST",
            content_type=batchwire.CONTENT_TYPE,
        )
        routes[batchwire.PATH] = self._batch_route
        # Exact paths in one dict: routing a request is a single lookup.
        self._routes = routes
        self.max_batch = 32
        """The most requests one ``predict_batch()`` call gets (``--max-batch``)."""

        self._no_route = Route({}, simple_error)
        self._unknown_path_message = (
            "no such endpoint; this server answers /v2/health/live, /v2/health/ready, "
            f"/v2/models/{name}[/ready|/infer], /v1/models/{name}:predict, "
            "/api/v1.0/predictions and /predict"
        )

    # -- routing --------------------------------------------------------------------

    def resolve(self, target: str) -> Route:
        """The route for a request target (query string ignored, %-escapes decoded)."""
        path = target.partition("?")[0]
        route = self._routes.get(path)
        if route is not None:
            return route
        if "%" in path:
            path = unquote(path)
            route = self._routes.get(path)
            if route is not None:
                return route
        if len(path) > 1 and path.endswith("/"):
            route = self._routes.get(path.rstrip("/"))
            if route is not None:
                return route
        if path.startswith(("/v2/models/", "/v1/models/")):
            requested = path[len("/v2/models/") :].split("/")[0].removesuffix(":predict")
            return self._model_not_found(requested)
        return self._no_route

    def _model_not_found(self, requested: str) -> Route:
        # An error path: building the route per request costs nothing that matters.
        body = simple_error(
            404, f"model {requested!r} not found: this server serves model {self.name!r}"
        )

        def handler(headers: dict[str, str], request_body: bytes) -> tuple[int, bytes]:
            return 404, body

        methods: dict[str, Handler] = dict.fromkeys(
            ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"), handler
        )
        return Route(methods, simple_error, ", ".join(methods))

    def unknown_path(self, method: str, path: str) -> bytes:
        """The 404 body for a path no route matches."""
        return simple_error(404, f"{method} {path}: {self._unknown_path_message}")

    # -- handlers -------------------------------------------------------------------

    def _answer(
        self, respond: Callable[[], bytes], headers: dict[str, str], error: ErrorBody
    ) -> tuple[int, bytes]:
        """``(200, respond())``, or the error answer for what it raised (never raises)."""
        try:
            return 200, respond()
        except RequestError as exc:
            return exc.status, error(exc.status, exc.message)
        except _PredictFailed as exc:
            return 500, error(500, str(exc))
        except NotSerializableError as exc:
            request_id = _request_id(headers)
            log.error(
                "request %s: predict() returned a value that is not JSON-serialisable: %s",
                request_id,
                exc,
            )
            return 500, error(
                500,
                f"predict() returned a value that is not JSON-serialisable ({exc}); "
                f"return lists, dicts, numbers, strings or booleans (request id "
                f"{request_id})",
            )
        except Exception:
            request_id = _request_id(headers)
            log.exception("request %s: internal error", request_id)
            return 500, error(500, f"internal error (request id {request_id})")

    def decode(
        self, route: Route, headers: dict[str, str], body: bytes
    ) -> Prepared | tuple[int, bytes]:
        """A batchable route's request decoded, or the error answer when it is malformed."""
        assert route.decode is not None
        try:
            return route.decode(headers, body)
        except RequestError as exc:
            return exc.status, route.error(exc.status, exc.message)
        except Exception:
            request_id = _request_id(headers)
            log.exception("request %s: internal error", request_id)
            return 500, route.error(500, f"internal error (request id {request_id})")

    def run_batch(self, batch: list[Prepared]) -> list[tuple[int, bytes]]:
        """Answers every request of ``batch`` (decoded by a route's ``decode``), with one
        ``predict_batch()`` call when there are several. When that call fails (or breaks
        its contract) each request is run on its own through ``predict()``, so each
        gets its own answer or its own error, as without batching."""
        if len(batch) == 1 or self._predict_batch is None:
            return [self._answer(partial(self._single, p), p.headers, p.error) for p in batch]
        try:
            results = self._predict_batch([p.payload for p in batch])
            if not isinstance(results, (list, tuple)) or len(results) != len(batch):
                raise _BatchContract(
                    f"predict_batch() returned {_describe_results(results)} for "
                    f"{len(batch)} payloads; return a list with one result per payload"
                )
        except Exception as exc:
            if not self._batch_warned:
                self._batch_warned = True
                log.warning(
                    "predict_batch() failed (%s); the requests of that batch are served "
                    "one by one through predict() (logged once)",
                    describe_exception(exc),
                )
            return [self._answer(partial(self._single, p), p.headers, p.error) for p in batch]
        return [
            self._answer(partial(p.finish, r), p.headers, p.error)
            for p, r in zip(batch, results, strict=True)
        ]

    def _serve_batch(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """``POST /shipyard/batch``: each part is a request to the route its ``path``
        names, with its ``headers`` (lower-case names); the answer has one part per
        request, in order, each what that request alone would have got. Prediction
        requests run through :meth:`run_batch` (``max_batch`` at a time)."""
        try:
            parts = batchwire.decode(body)
        except ValueError as exc:
            return 400, simple_error(400, f"malformed batch: {exc}")
        answers: list[tuple[int, bytes] | None] = [None] * len(parts)
        waiting: list[tuple[int, Prepared]] = []
        for i, part in enumerate(parts):
            path = part.head.get("path")
            got = part.head.get("headers") or {}
            if not isinstance(path, str) or not isinstance(got, dict):
                answers[i] = (
                    400,
                    simple_error(400, 'each part needs a "path" and "headers" as an object'),
                )
                continue
            item_headers = {str(k).lower(): str(v) for k, v in got.items()}
            route = self.resolve(path)
            if route is self._batch_route:
                answers[i] = (400, simple_error(400, "a batch cannot hold a batch"))
                continue
            handler = route.methods.get("POST")
            if handler is None and not route.methods:
                answers[i] = (404, self.unknown_path("POST", path))
            elif handler is None:
                answers[i] = (405, route.error(405, f"POST is not allowed on {path}"))
            elif route.decode is not None:
                decoded = self.decode(route, item_headers, part.body)
                if isinstance(decoded, tuple):
                    answers[i] = decoded
                else:
                    waiting.append((i, decoded))
            else:
                answers[i] = handler(item_headers, part.body)
        for start in range(0, len(waiting), max(1, self.max_batch)):
            chunk = waiting[start : start + max(1, self.max_batch)]
            for (i, _), answer in zip(chunk, self.run_batch([p for _, p in chunk]), strict=True):
                answers[i] = answer
        out = [
            batchwire.Part({"status": status, "content_type": "application/json"}, payload)
            for status, payload in (a or (500, simple_error(500, "not answered")) for a in answers)
        ]
        return 200, batchwire.encode(out)

    def _single(self, prepared: Prepared) -> bytes:
        return prepared.finish(self._run(prepared))

    def _run(self, prepared: Prepared) -> Any:
        context: dict[str, Any] | None = None
        if self._wants_context:
            context = {
                "headers": prepared.headers,
                "request_id": prepared.request_id,
                "protocol": prepared.protocol,
                "model_name": self.name,
                "parameters": prepared.parameters or {},
            }
        try:
            return self._predict(prepared.payload, context)
        except CALLER_ERRORS as exc:
            raise RequestError(f"predict() raised {describe_exception(exc)}") from exc
        except Exception as exc:
            request_id = prepared.request_id
            log.exception("request %s: predict() raised %s", request_id, type(exc).__name__)
            raise _PredictFailed(
                f"predict() failed; the model server log has the details (request id {request_id})"
            ) from exc

    def _decode_v2(self, headers: dict[str, str], body: bytes) -> Prepared:
        request = codec.oip_request(codec.loads(body))
        request_id = request.id or _request_id(headers)

        def finish(result: Any) -> bytes:
            response: dict[str, Any] = {
                "model_name": self.name,
                "id": request_id,
                "outputs": codec.oip_outputs(result, request.outputs),
            }
            if self.version:
                response["model_version"] = self.version
            return codec.dumps(response)

        return Prepared(
            request.payload, finish, headers, request_id, "v2", simple_error, request.parameters
        )

    def _decode_v1(self, headers: dict[str, str], body: bytes) -> Prepared:
        payload = codec.kserve_payload(codec.loads(body))
        return Prepared(
            payload,
            lambda result: codec.dumps({"predictions": result}),
            headers,
            _request_id(headers),
            "v1",
            simple_error,
        )

    def _decode_seldon(self, headers: dict[str, str], body: bytes) -> Prepared:
        payload = codec.seldon_payload(codec.loads(body))
        return Prepared(
            payload,
            lambda result: codec.dumps(codec.seldon_response(result)),
            headers,
            _request_id(headers),
            "seldon",
            seldon_error,
        )

    def _decode_raw(self, headers: dict[str, str], body: bytes) -> Prepared:
        return Prepared(
            codec.loads(body), codec.dumps, headers, _request_id(headers), "raw", simple_error
        )


def _request_id(headers: dict[str, str]) -> str:
    # The gateway sends X-Request-Id; direct callers get a fresh one.
    return headers.get("x-request-id") or os.urandom(8).hex()
