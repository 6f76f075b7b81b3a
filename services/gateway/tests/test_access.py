"""Private deployments: client keys (Bearer, HTTP Basic, X-API-Key) verified through a
stand-in keys service, user tokens, the caller's name in ``X-Forwarded-User`` as the model
sees it, revocation within a second, single-flight verification."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import aiohttp
import pytest

from shipyard_gateway.main import GatewayHost
from shipyard_testing import wait_for

from .conftest import INTERNAL_TOKEN, FakeKeys, FakeScheduler, ModelServer, publish, route

SECRET = "sk_mobile_secret"


def basic(client: str, secret: str) -> str:
    """The Authorization value of ``curl -u client:secret``."""
    return "Basic " + base64.b64encode(f"{client}:{secret}".encode()).decode()


async def raw_call(
    http: aiohttp.ClientSession, host: GatewayHost, deployment: str, headers: dict[str, str]
) -> tuple[int, Any, Any]:
    """A raw JSON call to the echo model; returns status, JSON body, headers."""
    async with http.post(
        f"{host.http_url}/deployments/{deployment}/predict",
        json={"hello": "world"},
        headers=headers,
    ) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


@pytest.fixture
async def private_echo(
    gateway: GatewayHost, scheduler: FakeScheduler, keys: FakeKeys, echo_model: ModelServer
) -> GatewayHost:
    """``echo``: private, group team-a, served by the echo model; a key for client
    ``mobile`` exists."""
    keys.add(SECRET, "echo", "mobile")
    await publish(scheduler, gateway, route("echo", echo_model.address, public=False))
    return gateway


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {SECRET}"},
        {"Authorization": basic("mobile", SECRET)},
        {"X-API-Key": SECRET},
    ],
    ids=["bearer", "basic", "x-api-key"],
)
async def test_client_key_reaches_the_model_as_its_client(
    private_echo: GatewayHost,
    keys: FakeKeys,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
) -> None:
    # A forged X-Forwarded-User is replaced by the gateway's word.
    status, body, _ = await raw_call(
        http, private_echo, "echo", {**headers, "X-Forwarded-User": "mallory"}
    )
    assert (status, body) == (200, {"user": "mobile", "protocol": "raw"})
    # The gateway called the keys service as itself, for this deployment.
    assert keys.authorizations[-1] == f"Bearer {INTERNAL_TOKEN}"
    assert keys.calls[-1][0] == "echo"


async def test_the_model_sees_the_user_of_a_user_token(
    private_echo: GatewayHost, http: aiohttp.ClientSession
) -> None:
    for headers in (
        {"Authorization": "Bearer ana-token"},
        {"X-API-Key": "ana-token"},
        {"Authorization": basic("whoever", "ana-token")},
    ):
        status, body, _ = await raw_call(http, private_echo, "echo", headers)
        assert (status, body) == (200, {"user": "ana", "protocol": "raw"}), headers


async def test_refusals(
    private_echo: GatewayHost, keys: FakeKeys, http: aiohttp.ClientSession
) -> None:
    cases: list[tuple[dict[str, str], int, str]] = [
        ({}, 401, "is private"),
        ({"Authorization": "Bearer sk_unknown"}, 401, "unknown client key"),
        ({"X-API-Key": "sk_unknown"}, 401, "unknown client key"),
        ({"Authorization": basic("someone-else", SECRET)}, 401, "does not match"),
        ({"Authorization": "Basic %%%"}, 401, "malformed Basic credentials"),
        ({"Authorization": basic("mobile", "")}, 401, "without a secret"),
        ({"X-API-Key": " "}, 401, "empty X-API-Key"),
        ({"Authorization": "Bearer bob-token"}, 403, "'bob' may not call deployment 'echo'"),
    ]
    for headers, expected, message in cases:
        status, body, response_headers = await raw_call(http, private_echo, "echo", headers)
        assert status == expected, (headers, body)
        assert message in body["error"], (headers, body)
        if status == 401:
            assert "Basic" in response_headers["WWW-Authenticate"]
            assert "Bearer" in response_headers["WWW-Authenticate"]
    # A key opens its own deployment only.
    keys.add("sk_other", "other", "mobile")
    status, body, _ = await raw_call(http, private_echo, "echo", {"X-API-Key": "sk_other"})
    assert status == 401


async def test_revocation_takes_effect_within_a_second(
    private_echo: GatewayHost, keys: FakeKeys, http: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": f"Bearer {SECRET}"}
    assert (await raw_call(http, private_echo, "echo", headers))[0] == 200
    keys.keys[SECRET].revoked = True
    revoked_at = time.monotonic()

    async def refused() -> bool:
        return (await raw_call(http, private_echo, "echo", headers))[0] == 401

    await wait_for(refused, timeout=1.2, message="the revoked key is refused within 1.2 s")
    assert time.monotonic() - revoked_at <= 1.2
    status, body, _ = await raw_call(http, private_echo, "echo", headers)
    assert status == 401 and "client key revoked" in body["error"]


async def test_verification_is_single_flight_and_cached(
    private_echo: GatewayHost, keys: FakeKeys, http: aiohttp.ClientSession
) -> None:
    keys.gate = asyncio.Event()
    headers = {"X-API-Key": SECRET}
    calls = [
        asyncio.ensure_future(raw_call(http, private_echo, "echo", headers)) for _ in range(20)
    ]
    await wait_for(lambda: len(keys.calls) == 1, message="the first verification arrived")
    keys.gate.set()
    results = await asyncio.gather(*calls)
    assert {status for status, _, _ in results} == {200}
    # Twenty concurrent requests, one question to the keys service; and the next ones
    # within the second reuse its answer.
    assert len(keys.calls) == 1
    assert private_echo.keys is not None and len(private_echo.keys) == 1


async def test_public_deployments_need_no_key(
    gateway: GatewayHost,
    scheduler: FakeScheduler,
    keys: FakeKeys,
    echo_model: ModelServer,
    http: aiohttp.ClientSession,
) -> None:
    await publish(scheduler, gateway, route("echo", echo_model.address, public=True))
    status, body, _ = await raw_call(http, gateway, "echo", {"X-Forwarded-User": "mallory"})
    assert (status, body) == (200, {"user": "", "protocol": "raw"})
    status, _, _ = await raw_call(http, gateway, "echo", {"X-API-Key": "sk_whatever"})
    assert status == 200
    assert keys.calls == []  # no lookups for public deployments


async def test_keys_service_down_is_503(
    make_gateway: Any,
    scheduler: FakeScheduler,
    echo_model: ModelServer,
    http: aiohttp.ClientSession,
) -> None:
    from .conftest import free_port_address

    gateway = await make_gateway(keys_addr=free_port_address())
    await publish(scheduler, gateway, route("echo", echo_model.address, public=False))
    status, body, _ = await raw_call(http, gateway, "echo", {"X-API-Key": SECRET})
    assert status == 503
    assert "cannot be verified right now" in body["error"]
    assert "127.0.0.1" not in body["error"]  # no internal addresses for callers
