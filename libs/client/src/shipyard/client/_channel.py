"""gRPC plumbing shared by the service wrappers: channels, token metadata, deadlines and
the translation of failed calls into :mod:`shipyard.client.errors`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from shipyard.client.config import ClientConfig
from shipyard.client.errors import ConfigError, from_rpc_error

DEFAULT_TIMEOUT = 30.0

StubT = TypeVar("StubT")

# Keepalive lets a notebook that sat idle for an hour notice a dead connection on the next
# call instead of hanging until the deadline; message size matches the servers' default.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class Transport:
    """Lazily opened gRPC channels, one per service address, and the call helper.

    Thread-safe: a notebook may call from several threads; channels are created once.
    """

    def __init__(
        self, config: ClientConfig, *, token: str | None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._config = config
        self._token = token
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[tuple[str, Callable[[grpc.Channel], Any]], Any] = {}
        self._lock = threading.Lock()

    @property
    def has_token(self) -> bool:
        """Whether calls carry a token."""
        return bool(self._token)

    def address(self, service: str) -> str:
        """``host:port`` of a service; an unknown service is a :class:`ConfigError`."""
        try:
            return self._config.address(service)
        except KeyError:
            raise ConfigError(
                f"unknown service {service!r}: set SHIPYARD_{service.upper()}_ADDR "
                "or add it to the endpoints in config.json"
            ) from None

    def stub(self, service: str, stub_class: Callable[[grpc.Channel], StubT]) -> StubT:
        """The (cached) stub of ``stub_class`` on the service's channel, typed as that class."""
        key = (service, stub_class)
        with self._lock:
            stub: StubT | None = self._stubs.get(key)
            if stub is None:
                address = self.address(service)
                channel = self._channels.get(address)
                if channel is None:
                    channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
                    self._channels[address] = channel
                stub = stub_class(channel)
                self._stubs[key] = stub
            return stub

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token, when there is one."""
        if not self._token:
            return ()
        return (("authorization", f"Bearer {self._token}"),)

    def call(
        self,
        service: str,
        method: str,
        rpc: Callable[..., Any],
        request: Any,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Invokes a unary RPC with the token and a deadline; raises
        :class:`~shipyard.client.errors.ShipyardClientError` on failure."""
        deadline = self.timeout if timeout is None else timeout
        try:
            return rpc(request, metadata=self.metadata(), timeout=deadline)
        except grpc.RpcError as err:
            raise from_rpc_error(
                err,
                service=service,
                address=self.address(service),
                method=method,
                has_token=self.has_token,
                timeout=deadline,
            ) from None

    def close(self) -> None:
        """Closes every open channel; the transport reopens them on the next call."""
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
        for channel in channels:
            channel.close()
