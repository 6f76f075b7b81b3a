"""Input checks shared by every service, with messages that name the field and the fix."""

from __future__ import annotations

import math
import re

from shipyard_core.errors import InvalidArgument

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Deployment names (decision 0017): a DNS label of at most 40 characters starting with a
# letter, so that `<name>-r<revision>-<suffix>` and Kubernetes object names fit.
_DEPLOYMENT_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
# Instance types are conventionally dotted: cpu.small, gpu.a100.
_DOTTED_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


def name(field: str, value: str) -> str:
    """A DNS-label-like name (users, groups, deployments): ``[a-z0-9-]``, 1-63 chars."""
    if not value:
        raise InvalidArgument(field, "is required", f"give a {field} like 'team-a'")
    if not _NAME.match(value):
        raise InvalidArgument(
            field,
            f"{value!r} is not a valid name",
            "use 1-63 lowercase letters, digits and '-', a letter or digit at both ends",
        )
    return value


def dotted_name(field: str, value: str) -> str:
    """Like ``name`` but dots are allowed inside (instance types such as ``cpu.small``)."""
    if not value:
        raise InvalidArgument(field, "is required", f"give a {field} like 'cpu.small'")
    if not _DOTTED_NAME.match(value) or ".." in value:
        raise InvalidArgument(
            field,
            f"{value!r} is not a valid name",
            "use 1-63 lowercase letters, digits, '-' and '.', e.g. 'cpu.small'",
        )
    return value


def non_negative(field: str, value: float, *, maximum: float | None = None) -> float:
    """A finite number >= 0 (and <= maximum when given)."""
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(field, f"must be a number >= 0, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(field, f"must be at most {maximum}, got {value}")
    return value


def positive_int(field: str, value: int, *, maximum: int | None = None) -> int:
    """An integer >= 1 (and <= maximum when given)."""
    if value < 1:
        raise InvalidArgument(field, f"must be at least 1, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(field, f"must be at most {maximum}, got {value}")
    return value


def deployment_name(field: str, value: str) -> str:
    """A deployment name (it is part of every prediction URL and of Kubernetes names), or
    InvalidArgument on ``field``."""
    if not _DEPLOYMENT_NAME.match(value):
        raise InvalidArgument(
            field,
            f"{value!r} is not a valid deployment name" if value else "is required",
            "use 1-40 lowercase letters, digits and '-', starting with a letter and "
            "ending with a letter or digit, e.g. iris-prod",
        )
    return value
