"""Log queries: the checked filter, and which revisions of a deployment a caller reads."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from shipyard_core.auth import Principal
from shipyard_core.errors import InvalidArgument
from shipyard_core.validation import deployment_name

DEFAULT_TAIL = 2000
"""Lines a tail returns when the caller names no number."""
MAX_TAIL = 100_000
"""Most lines one tail returns (download the whole log for more)."""
MAX_GREP = 1000
"""Longest search text."""

_INSTANCE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,250}[a-z0-9])?$")


@dataclass(frozen=True)
class LogQuery:
    """Which lines: of ``deployment`` (one ``instance`` of it, or every one), or of one
    image ``build`` (``deployment`` and ``instance`` empty), stamped in ``[since,
    until)``, containing ``grep`` (case-insensitive)."""

    deployment: str
    instance: str = ""
    since: datetime | None = None
    until: datetime | None = None
    grep: str = ""
    build: str = ""

    @property
    def one_source(self) -> bool:
        """Whether the lines are of one source (an instance or a build), in its order."""
        return bool(self.instance or self.build)


def log_query(
    deployment: str,
    instance: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
    grep: str = "",
    *,
    build: str = "",
) -> LogQuery:
    """A checked :class:`LogQuery` (of a deployment, or of a ``build`` with
    ``deployment`` empty); InvalidArgument names the field and the fix."""
    if build:
        if deployment or instance:
            raise InvalidArgument(
                "build_id",
                "cannot be combined with a deployment or an instance",
                "ask for one build's log, or for a deployment's",
            )
        if not _INSTANCE.match(build):
            raise InvalidArgument(
                "build_id",
                f"{build!r} is not a build id",
                "see `shipyard image builds` for the ids",
            )
    else:
        deployment_name("deployment", deployment)
    if instance and not _INSTANCE.match(instance):
        raise InvalidArgument(
            "instance",
            f"{instance!r} is not an instance id",
            "see `shipyard deploy instances NAME` for the ids",
        )
    if since is not None and until is not None and since >= until:
        raise InvalidArgument(
            "until",
            f"must be after since ({since.isoformat()}), got {until.isoformat()}",
            "swap them, or leave one out",
        )
    if len(grep) > MAX_GREP:
        raise InvalidArgument("grep", f"is {len(grep)} characters long", f"use at most {MAX_GREP}")
    if "\x00" in grep:
        raise InvalidArgument("grep", "contains a NUL character", "search for other text")
    return LogQuery(deployment, instance, since, until, grep, build)


def check_limit(field: str, value: int, default: int = DEFAULT_TAIL) -> int:
    """A number of lines: 0 means ``default``; 1..MAX_TAIL."""
    if value == 0:
        return default
    if value < 0 or value > MAX_TAIL:
        raise InvalidArgument(
            field,
            f"must be between 1 and {MAX_TAIL}, got {value}",
            "download the whole log of an instance for more",
        )
    return value


@dataclass(frozen=True)
class RevisionRange:
    """Revisions ``first <= r < end`` (``end`` None: no upper bound)."""

    first: int
    end: int | None


def visible_ranges(
    caller: Principal, lives: Sequence[tuple[int, str]]
) -> list[RevisionRange] | None:
    """The revision ranges of a deployment whose lines ``caller`` may read, given its
    lives as ``(first_revision, group)`` sorted by first revision. None means every
    line (admins); an empty list means none (the deployment is not the caller's)."""
    if caller.admin:
        return None
    ranges: list[RevisionRange] = []
    for i, (first, group) in enumerate(lives):
        if caller.can_see(group):
            end = lives[i + 1][0] if i + 1 < len(lives) else None
            ranges.append(RevisionRange(0 if i == 0 else first, end))
    if len(ranges) == 1 and ranges[0].first == 0 and ranges[0].end is None:
        return None
    return ranges
