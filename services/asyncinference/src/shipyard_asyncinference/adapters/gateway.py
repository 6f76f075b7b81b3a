"""Runs attempts of requests through the gateway's data plane.

``POST {gateway}/deployments/{d}/async/runs`` with the internal token and several
requests of one deployment in the batch wire format (:mod:`shipyard_runtime.batchwire`):
the gateway routes them like synchronous requests of their original callers (wakes a
deployment scaled to zero, picks a ready instance, passes each caller in
``X-Forwarded-User``) in one exchange with the model server, and answers each with the
model server's answer unchanged. ``answered_by`` (``X-Shipyard-Answered-By`` for a whole
answer) says whether the model or the gateway itself answered, which decides what a
failure means. Against a gateway from before that route, each request goes alone to
``POST {gateway}/deployments/{d}/async/{id}/run`` (also the batch jobs' way).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from shipyard_asyncinference.domain import AsyncRequest
from shipyard_runtime import batchwire

log = logging.getLogger(__name__)

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
    whole: bool = False
    """The answer of a whole call of several requests (not of this one alone)."""

    @property
    def ok(self) -> bool:
        """The model answered with success: the body is the result."""
        return not self.error


def _snippet(body: bytes) -> str:
    return body[:500].decode("utf-8", errors="replace").strip()


def _outcome(status: int, content_type: str, data: bytes, by: str) -> Outcome:
    """What an answer means for the attempt: the model's success is the result; the
    model's 4xx and the gateway's final refusals end the request; the rest is retried."""
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


_SINGLE_SECONDS = 60.0
"""How long to send requests one by one after a gateway without the batch route."""
_SINGLE_CONCURRENCY = 8
"""Requests of one call sent at once when they go one by one."""


class GatewayRunner:
    """Calls the gateway for workers (one HTTP connection pool per process)."""

    def __init__(self, gateway_url: str, internal_token: str, timeout_seconds: float) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.internal_token = internal_token
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._single_until = 0.0

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    def url(self, deployment: str, request_id: str) -> str:
        """The run route of one request."""
        return f"{self.gateway_url}/deployments/{quote(deployment, safe='')}/async/{request_id}/run"

    async def run_batch(self, runs: Sequence[tuple[AsyncRequest, bytes]]) -> list[Outcome]:
        """One attempt of each ``(request, payload)``, all of one deployment, in one call;
        the outcomes in order. A failure of the call as a whole is each request's outcome,
        marked ``whole``. One request goes alone through the run route (no framing)."""
        if len(runs) == 1:
            return [await self.run(*runs[0])]
        if time.monotonic() < self._single_until:
            return await self._one_by_one(runs)
        deployment = runs[0][0].deployment
        parts = [
            batchwire.Part(
                {
                    "model_path": agg.model_path,
                    "caller": agg.caller,
                    "group": agg.group,
                    "content_type": agg.content_type,
                    "request_id": agg.client_request_id or agg.id,
                },
                body,
            )
            for agg, body in runs
        ]
        url = f"{self.gateway_url}/deployments/{quote(deployment, safe='')}/async/runs"
        got = await self._post(
            url, batchwire.encode(parts), {"Content-Type": batchwire.CONTENT_TYPE}
        )
        if isinstance(got, Outcome):
            return [dataclasses.replace(got, whole=True)] * len(runs)
        status, content_type, data, by = got
        if by is None and status in (404, 405):
            # A gateway from before the batch route (a rolling upgrade): one by one for a
            # while, then the batch route again.
            self._single_until = time.monotonic() + _SINGLE_SECONDS
            return await self._one_by_one(runs)
        if status == 200 and content_type == batchwire.CONTENT_TYPE:
            try:
                answers = batchwire.decode(data)
            except ValueError as exc:
                answers = []
                log.warning("the gateway's batch answer is malformed: %s", exc)
            if len(answers) == len(runs):
                return [
                    _outcome(
                        int(a.head.get("status", 502)),
                        str(a.head.get("content_type") or "application/json"),
                        a.body,
                        str(a.head.get("answered_by", "gateway")),
                    )
                    for a in answers
                ]
            bad = Outcome(502, "", b"", error="the gateway's batch answer is malformed", whole=True)
            return [bad] * len(runs)
        whole = dataclasses.replace(
            _outcome(status, content_type, data, by or "gateway"), whole=True
        )
        return [whole] * len(runs)

    async def _one_by_one(self, runs: Sequence[tuple[AsyncRequest, bytes]]) -> list[Outcome]:
        """Each through the run route, a few at a time (as a worker sent them before)."""
        slots = asyncio.Semaphore(_SINGLE_CONCURRENCY)

        async def one(agg: AsyncRequest, body: bytes) -> Outcome:
            async with slots:
                return await self.run(agg, body)

        return list(await asyncio.gather(*(one(agg, body) for agg, body in runs)))

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
            "Content-Type": content_type,
            MODEL_PATH_HEADER: model_path,
            CALLER_HEADER: caller,
            GROUP_HEADER: group,
            "X-Request-Id": request_id,
        }
        got = await self._post(self.url(deployment, ref), body, headers)
        if isinstance(got, Outcome):
            return got
        status, content_type, data, by = got
        return _outcome(status, content_type, data, by or "gateway")

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str, bytes, str | None] | Outcome:
        """The gateway's answer, ``(status, content type, body, X-Shipyard-Answered-By)``,
        or the failed attempt's outcome when it gave none (no answer in time, not
        reachable)."""
        headers = {"Authorization": f"Bearer {self.internal_token}", **headers}
        try:
            async with self._client().post(url, data=body, headers=headers) as response:
                data = await response.read()
                return (
                    response.status,
                    response.headers.get("Content-Type", "application/json"),
                    data,
                    response.headers.get(ANSWERED_BY),
                )
        except TimeoutError:
            return Outcome(504, "", b"", error="no answer from the gateway in time")
        except aiohttp.ClientError as exc:
            return Outcome(503, "", b"", error=f"cannot reach the gateway: {exc}")

    async def close(self) -> None:
        """Closes the connection pool."""
        if self._session is not None:
            await self._session.close()
