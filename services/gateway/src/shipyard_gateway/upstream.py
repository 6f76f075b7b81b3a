"""HTTP to the model servers (``shipyard-runtime`` instances): one pooled client.

Failures are sorted by whether the request can have reached a model, because only a
request that certainly did not may be sent to another instance (``predict()`` is not
known to be idempotent, and a second run doubles the cost or the side effect):

- the connection could not be established (refused, unreachable, connect timeout):
  :class:`ConnectFailed`, safe to retry elsewhere;
- the model server did not answer in ``upstream_timeout_seconds``:
  :class:`~shipyard_gateway.errors.UpstreamTimeout` (504);
- the exchange broke after the request was sent (disconnect, malformed response):
  :class:`~shipyard_gateway.errors.BadGateway` (502).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from shipyard_gateway.errors import BadGateway, UpstreamTimeout

__all__ = ["ConnectFailed", "UpstreamClient", "UpstreamReply"]

log = logging.getLogger(__name__)

# Below the runtime's keep-alive timeout (75 s by default): the gateway closes an idle
# pooled connection before the model server does, so a request is never written into a
# connection the server is closing (which would fail it after sending, with no retry).
_KEEPALIVE_SECONDS = 15.0


class ConnectFailed(Exception):
    """No connection to ``address`` could be made: the request did not leave the gateway.
    Internal to the gateway (the handler retries elsewhere); never shown to a caller."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot connect to {address}: {reason}")
        self.address = address
        self.reason = reason


@dataclass(frozen=True)
class UpstreamReply:
    """A model server's answer, unchanged."""

    status: int
    body: bytes
    content_type: str


class UpstreamClient:
    """A keep-alive pool of connections to model servers, shared by every request.

    The session is created on first use, inside the running loop (aiohttp binds to it),
    and closed by :meth:`close`.
    """

    def __init__(
        self,
        *,
        timeout_seconds: float,
        connect_timeout_seconds: float,
        connections_per_host: int,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.connect_timeout_seconds = connect_timeout_seconds
        self.connections_per_host = connections_per_host
        self._session: aiohttp.ClientSession | None = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0,  # no global cap: the per-instance cap is what protects a model
                limit_per_host=self.connections_per_host,
                keepalive_timeout=_KEEPALIVE_SECONDS,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # `total` covers connecting, waiting for a pooled connection, sending and
                # reading the whole answer; `sock_connect` only the TCP handshake.
                timeout=aiohttp.ClientTimeout(
                    total=self.timeout_seconds, sock_connect=self.connect_timeout_seconds
                ),
                # The gateway is a proxy: it sends only the headers it means to.
                skip_auto_headers=("User-Agent",),
                raise_for_status=False,
            )
        return self._session

    async def post(
        self, address: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> UpstreamReply:
        """POSTs ``body`` to ``http://<address><path>`` (see :meth:`request`)."""
        return await self.request("POST", address, path, body, headers)

    async def request(
        self, method: str, address: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> UpstreamReply:
        """Sends ``method`` ``http://<address><path>`` with ``body`` (empty for GET) and
        returns the answer as is.

        Raises ConnectFailed (not sent; retry elsewhere), UpstreamTimeout or BadGateway.
        """
        session = self._ensure_session()
        url = f"http://{address}{path}"
        try:
            async with session.request(method, url, data=body, headers=headers) as response:
                payload = await response.read()
                return UpstreamReply(
                    status=response.status,
                    body=payload,
                    content_type=response.headers.get("Content-Type", "application/json"),
                )
        # Order matters: a connect timeout is also a TimeoutError, and a refused
        # connection also a ClientError.
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ConnectFailed(address, str(exc) or type(exc).__name__) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"the model server did not answer within {self.timeout_seconds:g}s; "
                "the request may still be running there"
            ) from exc
        except aiohttp.ClientError as exc:
            log.warning("model server %s broke the exchange: %r", address, exc)
            raise BadGateway(
                "the model server closed the connection or sent a malformed answer before "
                "finishing (it may have crashed); the request was not retried because it may "
                "have reached the model"
            ) from exc

    async def close(self) -> None:
        """Closes the pool (idle connections first; call after requests finished)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
