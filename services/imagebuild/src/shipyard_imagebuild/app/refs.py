"""Parsing ``name[:version]`` image references and resolving the caller's group."""

from __future__ import annotations

from shipyard_core import validation
from shipyard_core.auth import Principal
from shipyard_core.errors import InvalidArgument


def parse_ref(image: str, *, need_version: bool = False) -> tuple[str, int | None]:
    """``iris`` → (iris, None); ``iris:3`` → (iris, 3)."""
    if not image:
        raise InvalidArgument("image", "is required", "give NAME or NAME:VERSION, e.g. iris:1")
    name, _, version = image.partition(":")
    validation.name("image", name)
    if not version:
        if need_version:
            raise InvalidArgument("image", f"{image!r} has no version", f"use {name}:VERSION")
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise InvalidArgument("image", f"version {version!r} is not a number >= 1", "e.g. iris:1")
    return name, int(version)


def resolve_group(caller: Principal, group: str) -> str:
    """The group named, or the caller's only group; checks membership."""
    if not group:
        if len(caller.groups) == 1:
            group = next(iter(caller.groups))
        else:
            choices = ", ".join(sorted(caller.groups)) or "none"
            raise InvalidArgument(
                "group", "is required here", f"pass --group (your groups: {choices})"
            )
    validation.name("group", group)
    caller.require_member(group)
    return group
