"""Asynchronous predictions through the gateway: submit, status, result, list, cancel, wait.

>>> req = client.async_requests.submit("iris-prod", {"instances": [[5.1, 3.5, 1.4, 0.2]]})
>>> client.async_requests.wait("iris-prod", req.request_id).status
'completed'
>>> client.async_requests.result("iris-prod", req.request_id)

Every call goes to the gateway's REST data plane (``SHIPYARD_GATEWAY_URL``) with the
client's token, or ``token=`` (a user token or one of the deployment's client keys):
the same credentials as a synchronous prediction.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shipyard.client._channel import Transport
from shipyard.client._convert import PlainData
from shipyard.client.config import ClientConfig
from shipyard.client.deployments import (
    DEFAULT_PREDICT_TIMEOUT,
    GATEWAY,
    gateway_request,
)
from shipyard.client.errors import DeadlineExceeded, InvalidArgument

__all__ = ["ASYNC_STATUSES", "AsyncRequestView", "AsyncRequestsClient", "GatewayHttp"]

ASYNC_STATUSES = ("queued", "running", "completed", "failed", "cancelled")
"""Every status an async request can be in; the last three are final."""
_FINAL = frozenset({"completed", "failed", "cancelled"})
_TIMEOUT = 30.0


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass(frozen=True)
class AsyncRequestView(PlainData):
    """One async request (never its payload)."""

    request_id: str
    deployment: str
    status: str
    attempts: int = 0
    error: str = ""
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    expired: bool = False
    protocol: str = ""
    caller: str = ""
    payload_bytes: int = 0
    result_bytes: int = 0
    location: str = ""
    result_url: str = ""

    @property
    def done(self) -> bool:
        """Whether it ended (completed, failed or cancelled)."""
        return self.status in _FINAL

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AsyncRequestView:
        """From the gateway's status document."""
        return cls(
            request_id=str(data.get("request_id", "")),
            deployment=str(data.get("deployment", "")),
            status=str(data.get("status", "")),
            attempts=int(data.get("attempts") or 0),
            error=str(data.get("error") or ""),
            created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
            expires_at=_time(data.get("expires_at")),
            expired=bool(data.get("expired")),
            protocol=str(data.get("protocol") or ""),
            caller=str(data.get("caller") or ""),
            payload_bytes=int(data.get("payload_bytes") or 0),
            result_bytes=int(data.get("result_bytes") or 0),
            location=str(data.get("location") or ""),
            result_url=str(data.get("result_url") or ""),
        )


class GatewayHttp:
    """Calls of the gateway's REST routes with the client's token (or ``token=``)."""

    def __init__(self, transport: Transport, config: ClientConfig | None = None) -> None:
        self._transport = transport
        self._config = config or ClientConfig()

    def _token(self, token: str | None) -> str:
        if token is not None:
            return token
        header = dict(self._transport.metadata()).get("authorization", "")
        return header.removeprefix("Bearer ")

    def _url(self, deployment: str, suffix: str = "", gateway_url: str | None = None) -> str:
        if not deployment:
            raise InvalidArgument("deployment: give the deployment's name", service=GATEWAY)
        base = (gateway_url or self._config.gateway_url()).rstrip("/")
        return f"{base}/deployments/{urllib.parse.quote(deployment, safe='')}{suffix}"

    def _request(
        self,
        method: str,
        url: str,
        deployment: str,
        *,
        token: str | None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = _TIMEOUT,
    ) -> Any:
        return gateway_request(
            method,
            url,
            deployment,
            token=self._token(token),
            body=body,
            headers=headers,
            timeout=timeout,
        )


class AsyncRequestsClient(GatewayHttp):
    """Async predictions. Obtain it as ``Client().async_requests``."""

    def submit(
        self,
        deployment: str,
        payload: Any,
        *,
        token: str | None = None,
        gateway_url: str | None = None,
        timeout: float = DEFAULT_PREDICT_TIMEOUT,
    ) -> AsyncRequestView:
        """Sends ``payload`` (JSON, or ``bytes`` holding JSON) to the deployment's raw
        route with ``X-Async-Request: true``; returns the queued request (its id)."""
        if isinstance(payload, bytes | bytearray):
            body = bytes(payload)
        else:
            try:
                body = json.dumps(payload).encode()
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(
                    f"payload: cannot be sent as JSON: {exc}", service=GATEWAY, method="predict"
                ) from None
        answer = self._request(
            "POST",
            self._url(deployment, "/predict", gateway_url),
            deployment,
            token=token,
            body=body,
            headers={"Content-Type": "application/json", "X-Async-Request": "true"},
            timeout=timeout,
        )
        return AsyncRequestView.from_json(answer)

    def status(
        self,
        deployment: str,
        request_id: str,
        *,
        token: str | None = None,
        gateway_url: str | None = None,
    ) -> AsyncRequestView:
        """One request's status."""
        answer = self._request(
            "GET",
            self._url(deployment, f"/async/{_id(request_id)}", gateway_url),
            deployment,
            token=token,
        )
        return AsyncRequestView.from_json(answer)

    def result(
        self,
        deployment: str,
        request_id: str,
        *,
        token: str | None = None,
        gateway_url: str | None = None,
    ) -> Any:
        """A completed request's result (decoded JSON; text when it is not JSON).
        :class:`~shipyard.client.errors.Conflict` while it is not completed."""
        return self._request(
            "GET",
            self._url(deployment, f"/async/{_id(request_id)}/result", gateway_url),
            deployment,
            token=token,
        )

    def list(
        self,
        deployment: str,
        *,
        status: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
        token: str | None = None,
        gateway_url: str | None = None,
    ) -> list[AsyncRequestView]:
        """A deployment's async requests, newest first (members of its group, holders
        of its client keys, admins)."""
        query: dict[str, str] = {}
        if status:
            if status not in ASYNC_STATUSES:
                raise InvalidArgument(
                    f"status: {status!r} is not one of {', '.join(ASYNC_STATUSES)}",
                    service=GATEWAY,
                )
            query["status"] = status
        if since is not None:
            query["since"] = since.isoformat()
        if limit:
            query["limit"] = str(limit)
        suffix = "/async" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        answer = self._request(
            "GET", self._url(deployment, suffix, gateway_url), deployment, token=token
        )
        return [AsyncRequestView.from_json(r) for r in answer.get("requests", [])]

    def cancel(
        self,
        deployment: str,
        request_id: str,
        *,
        token: str | None = None,
        gateway_url: str | None = None,
    ) -> AsyncRequestView:
        """Cancels a queued request (:class:`~shipyard.client.errors.Conflict` once it
        runs or ended)."""
        answer = self._request(
            "POST",
            self._url(deployment, f"/async/{_id(request_id)}/cancel", gateway_url),
            deployment,
            token=token,
        )
        return AsyncRequestView.from_json(answer)

    def wait(
        self,
        deployment: str,
        request_id: str,
        *,
        timeout: float | None = None,
        token: str | None = None,
        gateway_url: str | None = None,
    ) -> AsyncRequestView:
        """Polls until the request ended (completed, failed or cancelled) and returns
        it; :class:`~shipyard.client.errors.DeadlineExceeded` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while True:
            view = self.status(deployment, request_id, token=token, gateway_url=gateway_url)
            if view.done:
                return view
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise DeadlineExceeded(
                    f"async request {request_id} of {deployment} is still {view.status} "
                    f"after {timeout:g}s",
                    service=GATEWAY,
                    method="wait",
                    hint=f"it goes on: `shipyard async status {deployment} {request_id}`",
                )
            time.sleep(pause if deadline is None else min(pause, max(deadline - now, 0.0)))
            pause = min(pause * 1.5, 1.0)


def _id(request_id: str) -> str:
    return urllib.parse.quote(request_id, safe="")
