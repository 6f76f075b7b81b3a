"""The routing table (deployment → ready instances) and the watcher that keeps it current.

:class:`RoutingTable` is the gateway's only state: one :class:`Route` per deployment,
the in-flight request count per instance address (for least-outstanding-requests
balancing), and waiters for deployments that have no ready instance yet. It is touched
from the event loop only, so it needs no locks; every method that changes it runs without
awaiting, so a reader never sees half of a change.

:class:`RouteWatcher` feeds it from the scheduler's server-streaming
``SchedulerService.WatchRoutes``: one RouteUpdate per deployment, then one with
``synced=true``, then every change (``removed`` deletes). The initial snapshot is buffered
and swapped in whole at ``synced``, so on a reconnect deployments absent from the new
snapshot are dropped and requests never see a half-loaded table; until then the previous
table keeps serving (the data plane outlives a scheduler restart). A broken stream is
reopened with backoff (0.2 s doubling to 5 s, back to 0.2 s after a stream that synced).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import grpc

from shipyard.scheduler.v1 import scheduler_pb2
from shipyard_core.aio import pause

__all__ = ["Access", "Route", "RouteSource", "RouteWatcher", "RoutingTable"]

log = logging.getLogger(__name__)


class Access(enum.Enum):
    """Who may call a deployment."""

    PRIVATE = "private"
    """Callers need a key, or a token of a member of the deployment's group."""
    PUBLIC = "public"
    """Anyone may call it."""

    @classmethod
    def from_proto(cls, value: int) -> Access:
        """The access of a ``shipyard.scheduler.v1.Access`` value; unspecified is private
        (when in doubt, ask for credentials)."""
        return cls.PUBLIC if value == scheduler_pb2.ACCESS_PUBLIC else cls.PRIVATE


@dataclass(frozen=True)
class Route:
    """Where one deployment's requests go, as the scheduler last described it."""

    deployment: str
    group: str
    access: Access = Access.PRIVATE
    revision: int = 0
    """The active revision (the one receiving traffic)."""
    addresses: tuple[str, ...] = ()
    """``host:port`` of every ready instance of the active revision."""
    scaled_to_zero: bool = False
    """No instance on purpose; ``Activate`` wakes it."""
    stopped: bool = False
    """Stopped by its owner: requests get 503 until it is started."""
    max_inflight: int = 0
    """Per-deployment concurrency limit at each gateway (0: the gateway's default,
    ``settings.max_inflight_per_deployment``); enforced by the handler (429)."""

    @property
    def ready(self) -> bool:
        """Whether at least one instance can take a request."""
        return bool(self.addresses)

    @classmethod
    def from_update(cls, update: scheduler_pb2.RouteUpdate) -> Route:
        """The route a (non-``synced``, non-``removed``) RouteUpdate describes."""
        return cls(
            deployment=update.deployment,
            group=update.group,
            access=Access.from_proto(update.access),
            revision=update.revision,
            # dict.fromkeys: drops duplicates but keeps the scheduler's order.
            addresses=tuple(dict.fromkeys(a for a in update.addresses if a)),
            scaled_to_zero=update.scaled_to_zero,
            stopped=update.stopped,
            max_inflight=update.max_inflight,
        )


class RoutingTable:
    """Deployments to routes, in-flight counts per instance, and readiness waiters."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._routes: dict[str, Route] = {}
        self._inflight: dict[str, int] = {}
        # Addresses that refused a connection, until when they are passed over: the
        # scheduler notices a dead instance only after its health checks, and until then
        # every request would first pay a failed connect (up to the connect timeout).
        self._unreachable: dict[str, float] = {}
        # Round-robin position per deployment, to break ties between equally loaded
        # instances (otherwise an idle table would send everything to the first address).
        self._turn: dict[str, int] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._synced = asyncio.Event()

    # --- reading -------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """Whether a complete snapshot was loaded at least once (the gateway is ready)."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        """Returns once the first complete snapshot is loaded."""
        await self._synced.wait()

    def get(self, deployment: str) -> Route | None:
        """The route of ``deployment``, or None when the table does not know it."""
        return self._routes.get(deployment)

    def routes(self) -> Mapping[str, Route]:
        """A read-only snapshot of every route, by deployment."""
        return MappingProxyType(dict(self._routes))

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, deployment: object) -> bool:
        return deployment in self._routes

    # --- changing (the watcher) ----------------------------------------------------------

    def update(self, route: Route) -> None:
        """Adds or replaces the route of ``route.deployment``."""
        self._routes[route.deployment] = route
        self._turn.setdefault(route.deployment, 0)
        self._wake(route.deployment)

    def remove(self, deployment: str) -> None:
        """Forgets ``deployment`` (it was deleted)."""
        self._routes.pop(deployment, None)
        self._turn.pop(deployment, None)
        self._wake(deployment)

    def replace(self, routes: Iterable[Route]) -> None:
        """Makes ``routes`` the whole table in one step (a complete snapshot): deployments
        not among them are dropped. Marks the table synced."""
        fresh = {route.deployment: route for route in routes}
        self._routes = fresh
        self._turn = {name: self._turn.get(name, 0) for name in fresh}
        self._synced.set()
        for name in list(self._waiters):
            self._wake(name)

    def _wake(self, deployment: str) -> None:
        # Waiters re-check the route themselves; waking them on every change of their
        # deployment (not only on "ready") lets them give up at once when it is stopped
        # or removed.
        for waiter in self._waiters.pop(deployment, ()):
            if not waiter.done():
                waiter.set_result(None)

    # --- waiting -------------------------------------------------------------------------

    async def wait_ready(self, deployment: str, timeout: float) -> Route | None:  # noqa: ASYNC109
        """The route of ``deployment`` as soon as it has at least one address.

        Returns None after ``timeout`` seconds, or as soon as a deployment that was known
        when the wait began is removed or stopped (look it up again to tell which). An
        unknown deployment is waited for: it may appear. Event-driven: it wakes on the
        table's changes, never polls.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        was_known = deployment in self._routes
        while True:
            route = self._routes.get(deployment)
            if route is not None and route.ready:
                return route
            if (route is None and was_known) or (route is not None and route.stopped):
                return None
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            waiter: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(deployment, set())
            waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return None
            finally:
                # A timed-out or cancelled waiter must not linger (nor its empty set, for a
                # deployment that never becomes ready).
                current = self._waiters.get(deployment)
                if current is not None:
                    current.discard(waiter)
                    if not current:
                        del self._waiters[deployment]

    # --- balancing -----------------------------------------------------------------------

    def pick(self, deployment: str, exclude: Set[str] = frozenset()) -> str | None:
        """The ready address of ``deployment`` with the fewest requests in flight (ties
        go round robin), skipping ``exclude``; None when there is none. Addresses marked
        :meth:`unreachable` are used only when no other one is left."""
        route = self._routes.get(deployment)
        if route is None:
            return None
        candidates = [a for a in route.addresses if a not in exclude]
        if not candidates:
            return None
        if self._unreachable:
            reachable = [a for a in candidates if not self._is_unreachable(a)]
            # All of them marked: try them anyway (the mark is a guess; refusing the
            # request outright would turn a blip into an outage).
            candidates = reachable or candidates
        least = min(self._inflight.get(a, 0) for a in candidates)
        best = [a for a in candidates if self._inflight.get(a, 0) == least]
        turn = self._turn.get(deployment, 0)
        self._turn[deployment] = turn + 1
        return best[turn % len(best)]

    def unreachable(self, address: str, seconds: float) -> None:
        """Passes ``address`` over for ``seconds`` (it refused a connection)."""
        now = self._clock()
        # Expired marks go here too: a dead instance's address may never be picked again.
        for expired in [a for a, until in self._unreachable.items() if until <= now]:
            del self._unreachable[expired]
        self._unreachable[address] = now + seconds

    def _is_unreachable(self, address: str) -> bool:
        until = self._unreachable.get(address)
        if until is None:
            return False
        if until <= self._clock():
            del self._unreachable[address]
            return False
        return True

    def inflight(self, address: str) -> int:
        """Requests in flight to ``address`` now."""
        return self._inflight.get(address, 0)

    @contextmanager
    def track(self, address: str) -> Iterator[None]:
        """Counts one request in flight to ``address`` for the ``with`` body."""
        self._inflight[address] = self._inflight.get(address, 0) + 1
        try:
            yield
        finally:
            left = self._inflight[address] - 1
            if left:
                self._inflight[address] = left
            else:
                # Addresses come and go with instances: keep only the busy ones.
                del self._inflight[address]


class RouteSource(Protocol):
    """What the watcher needs of the scheduler (:class:`~shipyard_gateway.scheduler.
    SchedulerClient`)."""

    def watch_routes(self) -> Any:
        """Starts a ``WatchRoutes`` call (grpc.aio: ``read()``, ``cancel()``)."""
        ...


class RouteWatcher:
    """Keeps a :class:`RoutingTable` current from ``WatchRoutes`` until stopped."""

    def __init__(
        self,
        table: RoutingTable,
        source: RouteSource,
        *,
        initial_backoff: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        self.table = table
        self.source = source
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.connected = False
        """Whether a stream is open and has synced (the table is live, not last-known)."""
        self.streams = 0
        """How many streams reached ``synced`` (for logs and tests)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Watches until ``stop`` is set, reconnecting with backoff whenever the stream
        ends or fails (a ServiceHost background task)."""
        backoff = self.initial_backoff
        failures = 0  # consecutive streams that ended before syncing
        while not stop.is_set():
            problem = ""
            try:
                await self._watch_once(stop)
                problem = "the scheduler ended the route stream"
            except grpc.aio.AioRpcError as err:
                problem = (
                    f"route stream from the scheduler failed ({err.code().name}: {err.details()})"
                )
            except Exception:
                # A bug in applying an update must not leave the gateway with a frozen
                # table: log it and resync from a fresh snapshot.
                log.exception("route stream failed; resyncing")
            # A stream that synced was healthy: its end (a scheduler restart) starts a
            # fresh backoff; consecutive failures to sync back off further.
            synced, self.connected = self.connected, False
            if stop.is_set():
                break
            failures = 0 if synced else failures + 1
            if problem:
                # One warning per outage, not one per retry while the scheduler is down.
                level = logging.WARNING if failures <= 1 else logging.DEBUG
                log.log(level, "%s; reconnecting (attempt %d)", problem, failures + 1)
            if synced:
                backoff = self.initial_backoff
            await pause(stop, backoff)
            if not synced:
                backoff = min(backoff * 2, self.max_backoff)

    async def _watch_once(self, stop: asyncio.Event) -> None:
        """One stream, until it ends, fails or ``stop``; sets ``connected`` once synced."""
        call = self.source.watch_routes()
        # The initial snapshot, buffered until `synced` so that it replaces the table
        # whole; None once synced (then updates apply one by one).
        pending: dict[str, Route] | None = {}
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                read = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    return
                update = read.result()
                if update is grpc.aio.EOF:
                    return
                if pending is not None:
                    if update.synced:
                        self.table.replace(pending.values())
                        pending = None
                        self.connected = True
                        self.streams += 1
                        log.info(
                            "routes synced from the scheduler: %d deployments", len(self.table)
                        )
                    elif update.removed:
                        pending.pop(update.deployment, None)
                    elif update.deployment:
                        pending[update.deployment] = Route.from_update(update)
                elif update.removed:
                    self.table.remove(update.deployment)
                elif update.deployment:
                    self.table.update(Route.from_update(update))
        finally:
            stopped.cancel()
            call.cancel()
