"""Calling the Kubernetes API with Shipyard's errors (for the adapters that drive a
cluster: imagebuild's Kaniko builds, the scheduler's kubernetes backend).

Needs the ``kubernetes`` client (the ``shipyard-core[kubernetes]`` extra); the services
that use it depend on it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from shipyard_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ShipyardError,
    Unavailable,
)


def api_message(exc: ApiException) -> str:
    """The API server's own message (from its Status body) or the HTTP reason."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return f"HTTP {exc.status} {exc.reason or ''}".strip()


def call(doing: str, fn: Callable[..., Any], /, *, rbac_hint: str, **kwargs: Any) -> Any:
    """Calls the Kubernetes API, turning its failures into Shipyard errors: 404 is
    ``NotFound`` and 409 ``AlreadyExists`` (callers catch those), refusals and rejected
    objects ``FailedPrecondition`` (the cluster's configuration, not the caller, must
    change; ``rbac_hint`` says what to grant), an unreachable, slow or overloaded API
    server ``Unavailable`` (a later attempt retries)."""
    try:
        return fn(**kwargs)
    except ApiException as exc:
        status, message = exc.status or 0, api_message(exc)
        error: ShipyardError
        if status == 404:
            error = NotFound(f"{doing}: {message}")
        elif status == 409:
            error = AlreadyExists(f"{doing}: {message}")
        elif status in (401, 403):
            error = FailedPrecondition(f"the cluster refused {doing}: {message} ({rbac_hint})")
        elif status == 429 or status >= 500 or status == 0:
            error = Unavailable(f"the Kubernetes API failed {doing}: {message}")
        else:
            error = FailedPrecondition(f"the cluster rejected {doing}: {message}")
        raise error from exc
    except urllib3.exceptions.HTTPError as exc:
        raise Unavailable(f"cannot reach the Kubernetes API for {doing}: {exc}") from exc
