"""Runs one attempt of a request through the gateway's data plane.

``POST {gateway}/deployments/{d}/async/{id}/run`` with the internal token: the gateway
routes it like a synchronous request of the original caller (wakes a deployment scaled
to zero, balances over ready instances, passes the caller in ``X-Forwarded-User``) and
answers with the model server's answer unchanged. ``X-Shipyard-Answered-By`` says
whether the model or the gateway itself answered, which decides what a failure means.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from shipyard_asyncinference.domain import AsyncRequest

ANSWERED_BY = "X-Shipyard-Answered-By"
"""``model`` when the model server answered, ``gateway`` when the gateway did."""
MODEL_PATH_HEADER = "X-Shipyard-Model-Path"
CALLER_HEADER = "X-Shipyard-Caller"
GROUP_HEADER = "X-Shipyard-Group"

# Gateway refusals that another attempt cannot change: the deployment is gone (404), the
# original caller lost access (401/403), the request does not fit (400, 413).
_FINAL_GATEWAY = frozenset({400, 401, 403, 404, 413})


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    status: int
    content_type: str
    body: bytes
    error: str = ""
    final: bool = False
    """For a failure: retrying cannot help."""

    @property
    def ok(self) -> bool:
        """The model answered with success: the body is the result."""
        return not self.error


def _snippet(body: bytes) -> str:
    return body[:500].decode("utf-8", errors="replace").strip()


class GatewayRunner:
    """Calls the gateway for workers (one HTTP connection pool per process)."""

    def __init__(self, gateway_url: str, internal_token: str, timeout_seconds: float) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.internal_token = internal_token
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    def url(self, deployment: str, request_id: str) -> str:
        """The run route of one request."""
        return f"{self.gateway_url}/deployments/{quote(deployment, safe='')}/async/{request_id}/run"

    async def run(self, agg: AsyncRequest, body: bytes) -> Outcome:
        """One attempt of ``agg`` with its payload ``body``."""
        return await self.call(
            agg.deployment,
            agg.id,
            model_path=agg.model_path,
            caller=agg.caller,
            group=agg.group,
            content_type=agg.content_type,
            body=body,
            request_id=agg.client_request_id or agg.id,
        )

    async def call(
        self,
        deployment: str,
        ref: str,
        *,
        model_path: str,
        caller: str,
        group: str,
        content_type: str,
        body: bytes,
        request_id: str,
    ) -> Outcome:
        """One prediction of ``deployment`` as ``caller`` (``ref`` names it in the URL:
        an async request id, or ``batch-<job>``)."""
        headers = {
            "Authorization": f"Bearer {self.internal_token}",
            "Content-Type": content_type,
            MODEL_PATH_HEADER: model_path,
            CALLER_HEADER: caller,
            GROUP_HEADER: group,
            "X-Request-Id": request_id,
        }
        try:
            async with self._client().post(
                self.url(deployment, ref), data=body, headers=headers
            ) as response:
                data = await response.read()
                status = response.status
                content_type = response.headers.get("Content-Type", "application/json")
                by = response.headers.get(ANSWERED_BY, "gateway")
        except TimeoutError:
            return Outcome(504, "", b"", error="no answer from the gateway in time")
        except aiohttp.ClientError as exc:
            return Outcome(503, "", b"", error=f"cannot reach the gateway: {exc}")
        if by == "model":
            if status < 400:
                return Outcome(status, content_type, data)
            return Outcome(
                status,
                content_type,
                data,
                error=f"the model answered {status}: {_snippet(data)}",
                final=status < 500,
            )
        return Outcome(
            status,
            content_type,
            data,
            error=f"the gateway answered {status}: {_snippet(data)}",
            final=status in _FINAL_GATEWAY,
        )

    async def close(self) -> None:
        """Closes the connection pool."""
        if self._session is not None:
            await self._session.close()
