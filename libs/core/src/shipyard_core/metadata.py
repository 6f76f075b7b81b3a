"""Event metadata taken from the command's context: who, why, and the trace."""

from __future__ import annotations

import contextlib
import uuid
from contextvars import ContextVar
from typing import Any

# Set by whoever starts a unit of work (gRPC interceptor, projection runner) so that
# events record what caused them.
correlation_id_var: ContextVar[str | None] = ContextVar("shipyard_correlation_id", default=None)
causation_id_var: ContextVar[str | None] = ContextVar("shipyard_causation_id", default=None)


def current_metadata(**extra: Any) -> dict[str, Any]:
    """Actor, correlation and causation ids and the W3C trace context, plus ``extra``."""
    from shipyard_core.auth import current_principal
    from shipyard_core.errors import Unauthenticated
    from shipyard_core.telemetry import inject_headers

    meta: dict[str, Any] = {}
    # System-initiated work (bootstrap, policies) has no principal.
    with contextlib.suppress(Unauthenticated):
        meta["actor"] = current_principal().user
    correlation = correlation_id_var.get() or str(uuid.uuid4())
    meta["correlation_id"] = correlation
    causation = causation_id_var.get()
    if causation:
        meta["causation_id"] = causation
    meta.update(inject_headers({}))
    meta.update(extra)
    return meta
