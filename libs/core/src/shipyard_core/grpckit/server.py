"""ServiceHost: one Shipyard service process, from bind to graceful exit.

It owns the grpc.aio server (with the kit's interceptor, health checking and
reflection), the background tasks (outbox relay, projection runners, reconcilers) and the
close hooks (pools, connections), and shuts all of them down in order on SIGTERM/SIGINT::

    async def main() -> int:
        settings = QuotaSettings()
        configure_logging(settings)
        configure_tracing(settings.service_name, settings.otlp_endpoint)
        pool = await create_pool(settings.database_url)
        host = ServiceHost(settings)
        host.add_servicer(quota_pb2_grpc.add_QuotaServiceServicer_to_server, QuotaApi(pool))
        host.add_background("outbox-relay", relay.run)  # relay.run(stop: asyncio.Event)
        host.add_close_hook(pool.close)
        return await host.run()

    if __name__ == "__main__":
        raise SystemExit(asyncio.run(main()))

Tests use ``async with ServiceHost(settings_with_port_0, authenticator=fake) as host:``
and connect to ``host.address``.

Shutdown order: health NOT_SERVING and the ``stopping`` event (long-lived streams should
end on it) → the server stops accepting calls and gives in-flight ones the grace period
(``settings.shutdown_grace_seconds``) → background tasks see their stop event, get what
is left of the grace period, then are cancelled → close hooks, last added first →
buffered spans are flushed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shipyard_core.auth import Authenticator, authenticator_from_settings
from shipyard_core.grpckit.interceptors import ServerInterceptor
from shipyard_core.settings import CommonSettings
from shipyard_core.telemetry import flush_tracing

__all__ = ["BackgroundTask", "CloseHook", "ServiceHost"]

log = logging.getLogger(__name__)

S = TypeVar("S")

BackgroundTask = Callable[[asyncio.Event], Awaitable[None]] | Callable[[], Awaitable[None]]
"""A long-running coroutine function. With one parameter it receives the host's stop event
and should return soon after it is set; without, it is stopped by cancellation only."""

CloseHook = Callable[[], Awaitable[None] | None]
"""Called once at shutdown, after calls and background tasks finished (e.g. ``pool.close``)."""


class _Recorder:
    """Stands in for the server while a generated ``add_XServicer_to_server`` runs, to
    learn the service names before the real server exists (it is created in ``start``,
    inside the running loop)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.generic: list[Any] = []
        self.registered: list[tuple[str, dict[str, Any]]] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        for handler in handlers:
            name = getattr(handler, "service_name", None)
            if callable(name) and name() not in self.names:
                self.names.append(name())
            self.generic.append(handler)

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, Any]) -> None:
        if service_name not in self.names:
            self.names.append(service_name)
        self.registered.append((service_name, handlers))


class ServiceHost:
    """Builds, runs and gracefully stops one service's gRPC server and background work.

    ``authenticator`` resolves bearer tokens; by default the identity service at
    ``settings.keys_addr`` (cached ``settings.auth_cache_seconds``), which the host then
    also closes. ``public_methods`` are full method names, or service prefixes ending in
    ``/``, that need no token (health and reflection never do). ``interceptors`` run
    inside the kit's own; ``options`` are grpc channel arguments for the server
    (``grpc.so_reuseport`` is off unless ``options`` turns it on).
    """

    def __init__(
        self,
        settings: CommonSettings,
        *,
        authenticator: Authenticator | None = None,
        public_methods: Iterable[str] = (),
        interceptors: Sequence[Any] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.settings = settings
        self._owns_authenticator = authenticator is None
        self.authenticator: Authenticator = (
            authenticator if authenticator is not None else authenticator_from_settings(settings)
        )
        self.public_methods = list(public_methods)
        self._extra_interceptors = list(interceptors)
        # gRPC sets SO_REUSEPORT by default on Linux, so a second process on a taken port
        # would silently share its traffic; a port conflict must fail loudly instead.
        self._options = [("grpc.so_reuseport", 0), *options]
        self._registrations = _Recorder()
        self._background: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._close_hooks: list[CloseHook] = []
        self._server: Any = None
        self._health: Any = None
        self._port: int | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # asyncio primitives bind to a loop on first use (3.10+), so creating them here,
        # possibly outside any loop, is safe.
        self.stopping = asyncio.Event()
        """Set when shutdown begins. Background tasks get it as their stop event;
        long-lived streaming handlers should end when it is set."""
        self._stop_requested = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None
        self._exit_code = 0

    # --- registration (before start) ---------------------------------------------------

    def add_servicer(self, add_to_server: Callable[[S, Any], None], servicer: S) -> list[str]:
        """Registers a servicer through its generated ``add_XServicer_to_server`` function
        and returns the full names of the services it added (for health and reflection)."""
        self._require_not_started("add_servicer")
        before = len(self._registrations.names)
        add_to_server(servicer, self._registrations)
        return self._registrations.names[before:]

    def add_generic_handler(self, handler: grpc.GenericRpcHandler) -> str | None:
        """Registers a generic handler (``grpc.method_handlers_generic_handler(...)``) and
        returns its service name when it has one (those get health and reflection)."""
        self._require_not_started("add_generic_handler")
        before = len(self._registrations.names)
        self._registrations.add_generic_rpc_handlers([handler])
        added = self._registrations.names[before:]
        return added[0] if added else None

    def add_background(self, name: str, task: BackgroundTask) -> None:
        """Runs ``task`` from ``start`` until shutdown. If it raises before shutdown, the
        error is logged and the host shuts down with exit code 1: a dead projection runner
        or outbox relay must not go unnoticed while the API keeps answering."""
        self._require_not_started("add_background")
        if any(existing == name for existing, _ in self._background):
            raise ValueError(f"a background task named {name!r} exists already")
        takes_stop_event = len(inspect.signature(task).parameters) >= 1
        stop = self.stopping

        def start() -> Awaitable[None]:
            return task(stop) if takes_stop_event else task()  # type: ignore[call-arg]

        self._background.append((name, start))

    def add_close_hook(self, hook: CloseHook) -> None:
        """Calls ``hook`` (sync or async) at shutdown; hooks run last-added first, so a
        resource opened after another is closed before it."""
        self._close_hooks.append(hook)

    # --- state ---------------------------------------------------------------------------

    @property
    def service_names(self) -> list[str]:
        """Full names of the registered services (not counting health and reflection)."""
        return list(self._registrations.names)

    @property
    def port(self) -> int:
        """The port the server is bound to (the real one when ``grpc_port`` is 0)."""
        if self._port is None:
            raise RuntimeError("the host is not started; await host.start() first")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` clients connect to."""
        host = self.settings.grpc_host
        if host in ("0.0.0.0", "", "[::]", "::"):  # noqa: S104 - a bind-any address, not a bind
            host = "127.0.0.1"
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def exit_code(self) -> int:
        """0, or 1 once a background task failed."""
        return self._exit_code

    @property
    def health_servicer(self) -> Any:
        """The grpc.aio health servicer (``await host.health_servicer.set(name, status)``
        to report a dependency outage), available after ``start``."""
        return self._health

    def _require_not_started(self, what: str) -> None:
        if self._server is not None:
            raise RuntimeError(f"{what} must be called before the host starts")

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> int:
        """Binds the server, starts it and the background tasks; returns the bound port.

        Must run inside the event loop that will serve (grpc.aio objects bind to it).
        """
        self._require_not_started("start")
        interceptor = ServerInterceptor(self.authenticator, self.public_methods)
        server = grpc.aio.server(
            interceptors=[interceptor, *self._extra_interceptors], options=self._options
        )
        self._server = server
        try:
            for service_name, handlers in self._registrations.registered:
                server.add_registered_method_handlers(service_name, handlers)
            server.add_generic_rpc_handlers(tuple(self._registrations.generic))
            self._health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            reflection.enable_server_reflection(
                [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
            )
            try:
                self._port = server.add_insecure_port(self.settings.grpc_address)
            except RuntimeError as exc:
                raise OSError(
                    f"cannot bind the gRPC server to {self.settings.grpc_address} (port in "
                    "use? set SHIPYARD_GRPC_PORT, or 0 for any free port)"
                ) from exc
            for name in ("", *self.service_names):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
            await server.start()
            for name, begin in self._background:
                task = asyncio.create_task(self._run_background(name, begin), name=name)
                self._tasks[name] = task
        except BaseException:
            await self.stop(grace=0)
            raise
        log.info(
            "%s serving on %s",
            self.settings.service_name,
            self.address,
            extra={"services": self.service_names, "port": self._port},
        )
        return self._port

    async def _run_background(self, name: str, begin: Callable[[], Awaitable[None]]) -> None:
        try:
            await begin()
        except asyncio.CancelledError:
            raise
        except Exception:
            if self.stopping.is_set():
                log.exception("background task %s failed while stopping", name)
            else:
                log.exception("background task %s failed; shutting the service down", name)
                self._exit_code = 1
                self.request_stop(f"background task {name} failed")
        else:
            if not self.stopping.is_set():
                log.info("background task %s finished", name)

    def request_stop(self, reason: str = "requested") -> None:
        """Asks :meth:`run` to shut down (signal handlers and failing tasks call this)."""
        if not self._stop_requested.is_set():
            log.info("stopping: %s", reason)
            self._stop_requested.set()

    async def wait_for_stop_request(self) -> None:
        """Returns once a stop was requested (signal, failed background task, request_stop)."""
        await self._stop_requested.wait()

    async def stop(self, grace: float | None = None) -> None:
        """Shuts down gracefully (see the module docstring); ``grace`` defaults to
        ``settings.shutdown_grace_seconds``. Idempotent; concurrent callers share one
        shutdown."""
        self._stop_requested.set()
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(
                self._shutdown(self.settings.shutdown_grace_seconds if grace is None else grace)
            )
        # shield: a caller cancelled while waiting must not abort the shutdown half way.
        await asyncio.shield(self._stop_task)

    async def _shutdown(self, grace: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.stopping.set()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            # Refuses new calls at once, waits up to `grace` for in-flight ones, then
            # cancels them.
            await self._server.stop(grace)
        await self._stop_background(max(0.0, deadline - loop.time()))
        for hook in reversed(self._close_hooks):
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("close hook %r failed", hook)
        if self._owns_authenticator:
            close = getattr(self.authenticator, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing the authenticator failed")
        flush_tracing()
        log.info("%s stopped", self.settings.service_name)

    async def _stop_background(self, allowed_seconds: float) -> None:
        tasks = [task for task in self._tasks.values() if not task.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=allowed_seconds)
        for task in pending:
            log.warning("background task %s did not stop in time; cancelling it", task.get_name())
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def run(self) -> int:
        """Starts, serves until SIGTERM/SIGINT (or :meth:`request_stop`), shuts down
        gracefully, and returns the exit code (0, or 1 after a failed background task).

        Starts the host unless it was started already (so ``main`` may ``await
        host.start()`` first, e.g. to report the bound port). After the first signal the
        handlers are removed, so a second Ctrl-C or SIGTERM interrupts a slow shutdown the
        default way.
        """
        if self._server is None:
            await self.start()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                # Not the main thread, or a platform without loop signal handlers: the
                # embedding code stops the host itself.
                log.debug("cannot install a handler for %s", sig.name)
        try:
            await self._stop_requested.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()
        return self._exit_code

    def _on_signal(self, sig: signal.Signals) -> None:
        self.request_stop(f"received {sig.name}")

    async def __aenter__(self) -> ServiceHost:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
