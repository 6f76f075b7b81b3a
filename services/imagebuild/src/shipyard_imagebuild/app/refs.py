"""Parsing ``name[:version]`` image references (and the group rule every service shares)."""

from __future__ import annotations

from shipyard_core import validation
from shipyard_core.auth import resolve_group
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


__all__ = ["parse_ref", "resolve_group"]
