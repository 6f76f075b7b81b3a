"""The transport-neutral prediction path: route, check access, wake, balance, forward.

Transports (the REST protocols in :mod:`shipyard_gateway.http`, the Open Inference
Protocol gRPC service in :mod:`shipyard_gateway.oip_grpc`) only turn their request into
``(deployment, model server path, body, headers)`` and the :class:`UpstreamResponse` or
the raised domain error back into their own shape; every decision is taken here, once:

1. unknown deployment → NotFound;
2. the access check (:class:`~shipyard_gateway.access.AccessControl`) → Unauthenticated /
   PermissionDenied; a version that is not the active revision → NotFound;
3. stopped → DeploymentStopped (503);
4. the deployment's concurrency limit at this gateway (``RouteUpdate.max_inflight``, else
   ``settings.max_inflight_per_deployment``) reached → TooManyRequests (429);
5. no ready instance (scaled to zero, or starting) → one ``Activate`` per deployment
   however many requests wait (single flight), then wait for an address, event-driven,
   up to ``activation_timeout_seconds`` → Unavailable;
6. the least loaded ready instance (fewest requests in flight, ties round robin) gets the
   request; when it refuses the connection the next one does (and the refusing one is
   passed over for ``unreachable_seconds``). Nothing is retried once the
   request may have reached a model: a timeout is 504, a broken exchange 502, and the
   model server's own answer, whatever its status, is passed through unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.trace import SpanKind

from shipyard_core.auth import Principal
from shipyard_core.errors import NotFound, ShipyardError, Unavailable
from shipyard_core.telemetry import extract_context, inject_headers, tracer
from shipyard_gateway.access import AccessControl
from shipyard_gateway.errors import BadGateway, DeploymentStopped, TooManyRequests, UpstreamTimeout
from shipyard_gateway.load import LoadTracker
from shipyard_gateway.routing import Route, RoutingTable
from shipyard_gateway.upstream import ConnectFailed, UpstreamClient
from shipyard_runtime import batchwire

__all__ = ["RAW_PREDICT_PATH", "Activator", "BatchItem", "PredictHandler", "UpstreamResponse"]

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

RAW_PREDICT_PATH = "/predict"
"""The model server's raw JSON route (``shipyard-runtime``: the body is ``predict()``'s
payload, its result the response)."""

_ACTIVATE_CALL_SECONDS = 10.0  # the Activate RPC only records the wish; it answers fast

_MAX_REQUEST_ID = 128

# Trace context passed on when the gateway records no span of its own.
_TRACE_HEADERS = ("traceparent", "tracestate")

_JSON = "application/json"

_NO_SPAN: AbstractContextManager[object] = nullcontext()


@dataclass(frozen=True)
class UpstreamResponse:
    """What a model server answered, to be passed to the caller unchanged."""

    status: int
    body: bytes
    content_type: str
    request_id: str
    """The ``X-Request-Id`` the request carried upstream (the caller's, or a fresh one)."""
    address: str
    """The instance that answered (for logs and metrics; not for callers)."""


class Activator(Protocol):
    """Wakes deployments scaled to zero (:class:`~shipyard_gateway.scheduler.SchedulerClient`)."""

    async def activate(self, deployment: str, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Asks for ``deployment`` to be woken; True when it was asleep."""
        ...


def not_found(deployment: str) -> NotFound:
    """The error for a deployment the routing table does not know."""
    return NotFound(f"deployment {deployment!r} does not exist; see `shipyard deploy list`")


def _request_id(headers: Mapping[str, str]) -> str:
    """The caller's ``X-Request-Id`` when it is reasonable, else a fresh one (bounded: it
    travels into the model server's logs and the caller's answer)."""
    supplied = headers.get("x-request-id") or ""
    if 0 < len(supplied) <= _MAX_REQUEST_ID and supplied.isascii() and supplied.isprintable():
        return supplied
    return os.urandom(16).hex()


@dataclass(frozen=True)
class BatchItem:
    """One request of :meth:`PredictHandler.forward_batch`."""

    path: str
    """The model server route."""
    body: bytes
    headers: Mapping[str, str]
    """Its headers, lower-case names (``content-type``, ``x-request-id``, trace context)."""
    principal: Principal | None
    """The caller it runs as (an async request's original caller)."""


def _check_version(route: Route, version: str) -> None:
    # A deployment's model version is its active revision: what `shipyard deploy show`
    # lists, and what changes with every rollout.
    if version != str(route.revision):
        raise NotFound(
            f"deployment {route.deployment!r} serves version {route.revision} (its active "
            f"revision), not {version[:40]!r}; omit the version or ask for {route.revision}"
        )


class PredictHandler:
    """Serves predictions for every transport (see the module docstring)."""

    def __init__(
        self,
        table: RoutingTable,
        access: AccessControl,
        activator: Activator,
        upstream: UpstreamClient,
        load: LoadTracker,
        *,
        activation_timeout: float,
        unreachable_seconds: float = 5.0,
        max_inflight: int = 256,
        trace_all: bool = True,
        on_upstream_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.table = table
        self.access = access
        self.activator = activator
        self.upstream = upstream
        self.load = load
        self.activation_timeout = activation_timeout
        self.unreachable_seconds = unreachable_seconds
        self.max_inflight = max_inflight
        """The concurrency limit of a deployment whose route sets none (0: unlimited)."""
        self.trace_all = trace_all
        self.on_upstream_error = on_upstream_error
        """Told ``(deployment, kind)`` of every failed exchange with a model server:
        ``connect`` (refused; sent elsewhere), ``timeout``, ``broken``."""
        """Record a span for every request; else only for requests that carry a
        ``traceparent`` (see ``GatewaySettings.trace_all_requests``)."""
        # One Activate call per deployment per wake-up, shared by every request waiting
        # for it; dropped once a waiter saw the wake-up end (ready, or given up), or when
        # found older than the activation timeout (a wake-up nobody waited for, from a
        # readiness probe).
        self._activations: dict[str, tuple[asyncio.Task[bool], float]] = {}

    async def predict(
        self,
        deployment: str,
        body: bytes,
        headers: Mapping[str, str],
        principal: Principal | None = None,
    ) -> UpstreamResponse:
        """A raw JSON prediction: ``body`` goes to ``predict()`` of a ready instance of
        ``deployment`` as is.

        ``headers`` are the request's (any case). ``principal`` is a caller the transport
        authenticated already, else None (credentials are then read from ``headers`` when
        the deployment is private). Raises the domain errors listed in the module
        docstring; the transport maps them (``shipyard_gateway.errors.HTTP_STATUS``).
        """
        return await self.forward(deployment, RAW_PREDICT_PATH, body, headers, principal)

    async def forward(
        self,
        deployment: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        principal: Principal | None = None,
        *,
        method: str = "POST",
        version: str = "",
    ) -> UpstreamResponse:
        """Like :meth:`predict`, to any route ``path`` of the model server (the protocol
        shapes, model metadata). ``headers`` must look names up case-insensitively (an
        aiohttp ``CIMultiDictProxy``) or have lower-cased names (gRPC metadata).
        ``version``, when given, must be the active revision (else NotFound)."""
        request_id = _request_id(headers)
        route = self.table.get(deployment)
        if route is None:
            raise not_found(deployment)
        caller = await self.access.caller(route, headers, principal)
        if version:
            _check_version(route, version)
        if route.stopped:
            raise DeploymentStopped(deployment)
        limit = route.max_inflight or self.max_inflight
        if limit and self.load.inflight(deployment) >= limit:
            raise TooManyRequests(
                f"deployment {deployment!r} has {limit} requests in progress at this gateway, "
                "its limit; retry shortly, or ask its owners to scale it out"
            )
        traceparent = headers.get("traceparent")
        span: AbstractContextManager[object] = _NO_SPAN
        if traceparent or self.trace_all:
            span = _tracer.start_as_current_span(
                f"predict {deployment}",
                # The caller's trace when it sent one (only the trace headers are read:
                # extracting from all of them would copy them all); else the current one
                # (the gRPC call's span, or none: a new trace).
                context=extract_context(
                    {"traceparent": traceparent, "tracestate": headers.get("tracestate") or ""}
                )
                if traceparent
                else None,
                kind=SpanKind.SERVER,
                attributes={"shipyard.deployment": deployment, "shipyard.request_id": request_id},
            )
        with span, self.load.track(deployment):
            upstream_headers = self._upstream_headers(
                headers, request_id, caller, method, traced=span is not _NO_SPAN
            )
            return await self._send(deployment, path, body, upstream_headers, request_id, method)

    async def forward_batch(
        self, deployment: str, items: Sequence[BatchItem]
    ) -> list[UpstreamResponse | ShipyardError]:
        """Several requests to one instance of ``deployment`` in one exchange (the
        model server's batch route; an async worker's lot): per item, the model server's
        answer or the refusal that item alone would get (the access check of its
        caller). The checks and the choice of an instance are those of :meth:`forward`,
        once for all; a refusal of the whole (unknown or stopped deployment, no instance
        in time) is raised. A model server without the batch route (an image built
        before it) gets the items one by one."""
        route = self.table.get(deployment)
        if route is None:
            raise not_found(deployment)
        if route.stopped:
            raise DeploymentStopped(deployment)
        out: dict[int, UpstreamResponse | ShipyardError] = {}
        parts: list[batchwire.Part] = []
        sent: list[tuple[int, str, dict[str, str]]] = []
        for i, item in enumerate(items):
            try:
                caller = await self.access.caller(route, item.headers, item.principal)
            except ShipyardError as exc:
                out[i] = exc
                continue
            request_id = _request_id(item.headers)
            headers = self._upstream_headers(item.headers, request_id, caller, "POST", traced=False)
            parts.append(
                batchwire.Part(
                    {"path": item.path, "headers": {k.lower(): v for k, v in headers.items()}},
                    item.body,
                )
            )
            sent.append((i, request_id, headers))
        if sent:
            # Load for the autoscaler, not against the callers' concurrency limit (see
            # LoadTracker.track_batch).
            with self.load.track_batch(deployment, len(sent)):
                replies = await self._send_batch(deployment, items, parts, sent)
            for (i, _, _), reply in zip(sent, replies, strict=True):
                out[i] = reply
        return [out[i] for i in range(len(items))]  # every item refused or sent

    async def _send_batch(
        self,
        deployment: str,
        items: Sequence[BatchItem],
        parts: list[batchwire.Part],
        sent: list[tuple[int, str, dict[str, str]]],
    ) -> list[UpstreamResponse | ShipyardError]:
        first = sent[0][1]
        whole = await self._send(
            deployment,
            batchwire.PATH,
            batchwire.encode(parts),
            {"Content-Type": batchwire.CONTENT_TYPE, "X-Request-Id": first},
            first,
            "POST",
        )
        if whole.status == 404:
            # A runtime from before the batch route: each on its own, as sync requests go.
            results = await asyncio.gather(
                *(
                    self._send(deployment, items[i].path, items[i].body, h, rid, "POST")
                    for i, rid, h in sent
                ),
                return_exceptions=True,
            )
            out: list[UpstreamResponse | ShipyardError] = []
            for result in results:
                if isinstance(result, ShipyardError | UpstreamResponse):
                    out.append(result)
                else:
                    raise result
            return out
        try:
            if whole.status != 200 or whole.content_type != batchwire.CONTENT_TYPE:
                raise ValueError(f"HTTP {whole.status}: {whole.body[:200]!r}")
            answers = batchwire.decode(whole.body)
            if len(answers) != len(sent):
                raise ValueError(f"{len(answers)} answers to {len(sent)} requests")
            return [
                UpstreamResponse(
                    status=int(answer.head.get("status", 502)),
                    body=answer.body,
                    content_type=str(answer.head.get("content_type") or _JSON),
                    request_id=rid,
                    address=whole.address,
                )
                for (_, rid, _), answer in zip(sent, answers, strict=True)
            ]
        except (ValueError, TypeError) as exc:
            log.warning("batch to %s at %s answered badly: %s", deployment, whole.address, exc)
            bad = Unavailable(f"the model server did not answer the batch as expected ({exc})")
            return [bad] * len(sent)

    async def authorize(
        self,
        deployment: str,
        headers: Mapping[str, str],
        principal: Principal | None = None,
        *,
        version: str = "",
    ) -> tuple[Route, Principal | None]:
        """The route of ``deployment`` and its caller once the access check passed (for
        the readiness answers, which need no model server, and for transports that check
        access before reading a request: pass the caller on to :meth:`forward`).
        Raises NotFound, Unauthenticated or PermissionDenied."""
        route = self.table.get(deployment)
        if route is None:
            raise not_found(deployment)
        caller = await self.access.caller(route, headers, principal)
        if version:
            _check_version(route, version)
        return route, caller

    def wake(self, deployment: str) -> None:
        """Asks for ``deployment`` to be woken if it is scaled to zero, without waiting
        (a readiness probe: the probe says "not ready", and the next one "ready")."""
        route = self.table.get(deployment)
        if route is not None and route.scaled_to_zero and not route.ready and not route.stopped:
            self._activation(deployment, self.activation_timeout)

    def _upstream_headers(
        self,
        headers: Mapping[str, str],
        request_id: str,
        caller: Principal | None,
        method: str,
        *,
        traced: bool,
    ) -> dict[str, str]:
        # Only these go upstream. In particular a caller's own X-Forwarded-User is dropped:
        # the model must be able to trust it as the gateway's word; and the caller's
        # credentials stay at the gateway.
        out = {"X-Request-Id": request_id}
        if method == "POST":
            out["Content-Type"] = headers.get("content-type") or _JSON
        if caller is not None:
            out["X-Forwarded-User"] = caller.user
        if traced:
            inject_headers(out)
        if "traceparent" not in out:
            for name in _TRACE_HEADERS:
                if headers.get(name):
                    out[name] = headers[name]
        return out

    async def _send(
        self,
        deployment: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        request_id: str,
        method: str,
    ) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.activation_timeout
        refused: set[str] = set()
        while True:
            address = self.table.pick(deployment, exclude=refused)
            if address is None:
                current = self.table.get(deployment)
                if refused and current is not None and current.ready:
                    raise Unavailable(
                        f"no instance of deployment {deployment!r} accepted a connection "
                        f"({len(refused)} tried); retry shortly"
                    )
                await self._wait_ready(deployment, deadline)
                continue
            try:
                with self.table.track(address):
                    reply = await self.upstream.request(method, address, path, body, headers)
            except UpstreamTimeout:
                self._count(deployment, "timeout")
                raise
            except BadGateway:
                self._count(deployment, "broken")
                raise
            except ConnectFailed as exc:
                self._count(deployment, "connect")
                # Not sent, so safe to send elsewhere.
                log.warning(
                    "request %s to %s: %s; trying another instance",
                    request_id,
                    deployment,
                    exc,
                )
                refused.add(address)
                self.table.unreachable(address, self.unreachable_seconds)
                continue
            return UpstreamResponse(
                status=reply.status,
                body=reply.body,
                content_type=reply.content_type,
                request_id=request_id,
                address=address,
            )

    def _count(self, deployment: str, kind: str) -> None:
        if self.on_upstream_error is not None:
            self.on_upstream_error(deployment, kind)

    def _activation(self, deployment: str, budget: float) -> asyncio.Task[bool]:
        """The wake-up of ``deployment`` in progress, or a new one (one Activate call,
        shared); ``budget`` is how long the caller may wait, in seconds."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        entry = self._activations.get(deployment)
        if entry is not None:
            activation, started = entry
            # An old, finished wake-up nobody waited for (a probe's) does not stand for
            # this one: the deployment may have been scaled to zero again since.
            if not (activation.done() and now - started > self.activation_timeout):
                return activation
        timeout = max(0.1, min(_ACTIVATE_CALL_SECONDS, budget))
        activation = asyncio.ensure_future(self.activator.activate(deployment, timeout))
        # Every waiter may be gone (cancelled) when it fails; read the error anyway so
        # asyncio does not log "exception was never retrieved".
        activation.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._activations[deployment] = (activation, now)
        return activation

    async def _wait_ready(self, deployment: str, deadline: float) -> None:
        """Returns once ``deployment`` has a ready instance, waking it when needed; raises
        NotFound, DeploymentStopped or Unavailable when it will not get one in time."""
        loop = asyncio.get_running_loop()
        route = self.table.get(deployment)
        if route is None:
            raise not_found(deployment)
        if route.stopped:
            raise DeploymentStopped(deployment)
        if route.ready:
            return
        activation = self._activation(deployment, deadline - loop.time())
        try:
            try:
                # shield: one waiter going away must not cancel the call the others share.
                await asyncio.shield(activation)
            except ShipyardError as err:
                current = self.table.get(deployment)
                if current is not None and current.scaled_to_zero and not current.ready:
                    raise Unavailable(
                        f"deployment {deployment!r} is scaled to zero and could not be woken "
                        f"({err.message}); retry shortly"
                    ) from err
                # Instances are starting anyway: the wake-up was not needed.
                log.warning("Activate(%s) failed: %s", deployment, err.message)
            ready = await self.table.wait_ready(deployment, max(0.0, deadline - loop.time()))
        finally:
            entry = self._activations.get(deployment)
            if entry is not None and entry[0] is activation and activation.done():
                del self._activations[deployment]
        if ready is not None:
            return
        current = self.table.get(deployment)
        if current is None:
            raise not_found(deployment)
        if current.stopped:
            raise DeploymentStopped(deployment)
        if current.ready:
            return
        raise Unavailable(
            f"deployment {deployment!r} has no ready instance: waited "
            f"{self.activation_timeout:g}s for one to start; see `shipyard deploy show "
            f"{deployment}` for why"
        )
