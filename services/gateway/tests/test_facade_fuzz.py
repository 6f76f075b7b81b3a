"""Schemathesis against the facade's own OpenAPI document.

1. Over stand-in services (which accept everything): every request the document calls
   valid is accepted (no false 400 from the facade's checks), every request it calls
   invalid is refused with a 4xx, and every answer matches its documented schema, so
   the document and the facade agree in both directions.
2. Over the real services (PostgreSQL, NATS, keys, quota, imagebuild, scheduler) as a
   member of team-a (and as an admin for the quota operations): no 5xx, no crash, every
   answer as documented, and no internals (tracebacks, file paths, SQL, addresses) in
   any error body.

Bounded: a fixed number of examples per operation and mode, derandomized (the same
cases on every run, so a failure reproduces), under a minute in all. Hypothesis runs in
a worker thread so the event loop keeps serving the facade and the services meanwhile.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks as openapi_checks

from shipyard_gateway.facade import Api
from shipyard_testing import folder_tar, wait_for

from .facade_conftest import (
    SERVE,
    ControlPlane,
    control_plane,
    serve_facade,
    stand_in_server,
)

__all__ = ["control_plane"]  # the fixture, imported so pytest finds it here

# The upload body (a gzipped tar) is opaque bytes, sent like application/octet-stream.
schemathesis.serializer.alias("application/gzip", "application/octet-stream")

CONFORMANCE = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
]

# What must never be in an error body: stack traces, source paths, SQL, driver names,
# gRPC transport details and service addresses.
LEAK = re.compile(
    r"Traceback \(most recent call last\)"
    r'|File "[^"]*", line \d+'
    r"|(?:/[\w.-]+){2,}\.py\b"
    r"|site-packages"
    r"|\b(?:SELECT|INSERT INTO|DELETE FROM|UPDATE)\b.*\b(?:FROM|VALUES|SET|WHERE)\b"
    r"|asyncpg|psycopg|debug_error_string|ipv[46]:"
    r"|\b127\.0\.0\.1:\d+",
    re.IGNORECASE,
)


def _strings(value: Any) -> Iterator[str]:
    """Every string in a case's parameters and body (what an error may quote back)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _assert_no_leak(case: schemathesis.Case[Any], status: int, text: str) -> None:
    if status < 400:
        return
    # Remove what the caller sent: a refusal may quote the caller's own input.
    echoed = [*_strings(case.path_parameters), *_strings(case.query), *_strings(case.body)]
    for s in sorted((s for s in echoed if len(s) >= 3), key=len, reverse=True):
        text = text.replace(s, "").replace(repr(s)[1:-1], "")
    match = LEAK.search(text)
    assert match is None, f"internals in an error body ({match.group(0)!r}): {text[:500]}"


def _dropped_on_the_wire(case: schemathesis.Case[Any]) -> bool:
    # Schemathesis's negative mode may add a query parameter whose value is an empty
    # list, which the HTTP client then leaves out: the request sent is valid after all.
    return any(value == [] for value in (case.query or {}).values())


def _fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    checks: list[Any],
    base_url: str,
    token: str,
    max_examples: int,
) -> None:
    """Runs one operation in one mode; raises what hypothesis found."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        print_blob=False,
    )
    def run(case: schemathesis.Case[Any]) -> None:
        hypothesis.assume(not _dropped_on_the_wire(case))
        response = case.call(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        case.validate_response(response, checks=checks)
        _assert_no_leak(case, response.status_code, response.text)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Nothing to make invalid (no parameters, no body): nothing to test.
        if mode != GenerationMode.NEGATIVE:
            raise


def fuzz(
    document: dict[str, Any],
    base_url: str,
    token: str,
    *,
    checks: dict[GenerationMode, list[Any]],
    max_examples: int,
    tags: frozenset[str] | None = None,
) -> list[str]:
    """Runs schemathesis over every operation (with one of ``tags``, when given) in each
    mode of ``checks``; returns the failures (empty: all passed). Blocking: run it in a
    thread."""
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    # Deletions last, so the other operations meet the seeded resources first.
    operations.sort(key=lambda op: op.method.upper() == "DELETE")
    for operation in operations:
        if tags is not None and not tags & set(operation.definition.raw.get("tags", [])):
            continue
        for mode, mode_checks in checks.items():
            try:
                _fuzz_operation(operation, mode, mode_checks, base_url, token, max_examples)
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} ({mode.value}):\n{exc}")
    return failures


async def test_the_document_and_the_facade_agree() -> None:
    document = Api().document("/api/v1")
    async with stand_in_server() as (_, addresses), serve_facade(addresses) as base_url:
        failures = await asyncio.to_thread(
            fuzz,
            document,
            base_url,
            "any-token",
            checks={
                GenerationMode.POSITIVE: [
                    *CONFORMANCE,
                    openapi_checks.positive_data_acceptance,
                ],
                GenerationMode.NEGATIVE: [
                    *CONFORMANCE,
                    openapi_checks.negative_data_rejection,
                ],
            },
            max_examples=25,
        )
    assert not failures, "\n\n".join(failures)


@pytest.fixture(scope="module")
async def seeded(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with what the document's examples name: image iris:1 and
    deployment iris-prod (scaled to zero, so nothing starts) of team-a, so the explicit
    examples reach past "not found" into the services' deeper checks."""
    async with aiohttp.ClientSession() as session:
        rest = control_plane.client(session)
        reply = await rest.post(
            "/builds",
            data=folder_tar({"serve.py": SERVE, "VERSION": "1"}),
            params={"name": "iris"},
        )
        assert reply.status == 202, reply.body
        path = f"/builds/{reply.body['build_id']}"

        async def built() -> bool:
            state = (await rest.get(path)).body["state"]
            assert state != "failed"
            return bool(state == "succeeded")

        await wait_for(built, timeout=240, interval=0.2, message="iris was never built")
        spec = {
            "image": "iris:1",
            "instance_type": "cpu.small",
            "scaling": {"min_replicas": 0, "max_replicas": 1},
        }
        reply = await rest.post("/deployments", json={"name": "iris-prod", "spec": spec})
        assert reply.status == 201, reply.body
    return control_plane


@pytest.mark.parametrize(
    ("user", "tags"),
    [("ana", None), ("admin", frozenset({"quotas"}))],
    ids=["member-everything", "admin-quotas"],
)
async def test_no_5xx_and_no_leaks_on_the_real_services(
    seeded: ControlPlane, user: str, tags: frozenset[str] | None
) -> None:
    control_plane = seeded
    document = control_plane.document
    failures = await asyncio.to_thread(
        fuzz,
        document,
        control_plane.base_url,
        control_plane.tokens[user],
        checks={GenerationMode.POSITIVE: CONFORMANCE, GenerationMode.NEGATIVE: CONFORMANCE},
        max_examples=15,
        tags=tags,
    )
    assert not failures, "\n\n".join(failures)
