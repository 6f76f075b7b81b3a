"""Imagebuild's queries, on the catalog projection."""

from __future__ import annotations

from typing import Any

import asyncpg

from shipyard_core.auth import Principal
from shipyard_core.errors import InvalidArgument, NotFound
from shipyard_imagebuild.app.refs import parse_ref, resolve_group
from shipyard_imagebuild.app.views import BuildView, ImageView
from shipyard_imagebuild.projections import CatalogProjection, UsageProjection

T = CatalogProjection.live_tables()


class ImageQueries:
    """Reads builds and images the caller may see."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def build(self, caller: Principal, build_id: str) -> BuildView:
        """One build; NOT_FOUND also when it belongs to a group the caller is not in."""
        if not build_id:
            raise InvalidArgument("build_id", "is required")
        row = await self.pool.fetchrow(f"SELECT * FROM {T['builds']} WHERE build_id = $1", build_id)
        if row is None or not caller.can_see(row["group_name"]):
            raise NotFound(f"build {build_id} does not exist; see `shipyard image builds`")
        return _build(row)

    async def builds(
        self, caller: Principal, group: str = "", name: str = "", limit: int = 50
    ) -> list[BuildView]:
        """Recent builds, newest first."""
        if not 0 < limit <= 1000:
            raise InvalidArgument("limit", f"must be between 1 and 1000, got {limit}")
        where, args = self._scope(caller, group)
        if name:
            args.append(name)
            where += f" AND name = ${len(args)}"
        args.append(limit)
        rows = await self.pool.fetch(
            f"SELECT * FROM {T['builds']} WHERE {where} ORDER BY queued_at DESC LIMIT ${len(args)}",
            *args,
        )
        return [_build(r) for r in rows]

    async def images(self, caller: Principal, group: str = "", name: str = "") -> list[ImageView]:
        """Live image versions, by name then newest version first."""
        where, args = self._scope(caller, group)
        if name:
            args.append(name)
            where += f" AND name = ${len(args)}"
        rows = await self.pool.fetch(
            f"SELECT * FROM {T['images']} WHERE {where} AND NOT deleted "
            "ORDER BY group_name, name, version DESC",
            *args,
        )
        return [_image(r) for r in rows]

    async def image(self, caller: Principal, group: str, image: str) -> ImageView:
        """``name:version``, or the latest version of ``name``."""
        group = resolve_group(caller, group)
        name, version = parse_ref(image)
        if version is None:
            row = await self.pool.fetchrow(
                f"SELECT * FROM {T['images']} WHERE group_name = $1 AND name = $2 "
                "AND NOT deleted ORDER BY version DESC LIMIT 1",
                group,
                name,
            )
        else:
            row = await self.pool.fetchrow(
                f"SELECT * FROM {T['images']} WHERE group_name = $1 AND name = $2 "
                "AND version = $3 AND NOT deleted",
                group,
                name,
                version,
            )
        if row is None:
            raise NotFound(
                f"image {image} does not exist in group {group}; see `shipyard image list`"
            )
        return _image(row)

    async def deployments_using(self, group: str, name: str, version: int) -> list[str]:
        """Deployments that use an image version (the usage projection, fed by the
        scheduler's events)."""
        rows = await self.pool.fetch(
            f"SELECT DISTINCT deployment FROM {UsageProjection.live_tables()['image_usage']} "
            "WHERE group_name = $1 AND image_name = $2 AND image_version = $3 "
            "ORDER BY deployment",
            group,
            name,
            version,
        )
        return [r["deployment"] for r in rows]

    def _scope(self, caller: Principal, group: str) -> tuple[str, list[Any]]:
        if group:
            return "group_name = $1", [resolve_group(caller, group)]
        if caller.admin:
            return "true", []
        return "group_name = ANY($1::text[])", [sorted(caller.groups)]


def _build(r: asyncpg.Record) -> BuildView:
    return BuildView(
        build_id=r["build_id"],
        group=r["group_name"],
        name=r["name"],
        state=r["state"],
        version=r["version"],
        cache_hit=r["cache_hit"],
        reason=r["reason"],
        log_tail=r["log_tail"],
        requested_by=r["requested_by"],
        queued_at=r["queued_at"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        attempts=r["attempts"],
        source_digest=r["source_digest"],
    )


def _image(r: asyncpg.Record) -> ImageView:
    return ImageView(
        group=r["group_name"],
        name=r["name"],
        version=r["version"],
        digest=r["digest"],
        size_bytes=r["size_bytes"],
        python=r["python"],
        packages=[(str(n), str(v)) for n, v in r["packages"]],
        created_by=r["created_by"],
        created_at=r["created_at"],
        source=f"{r['source_name']} ({r['source_digest'][:19]})",
        build_id=r["build_id"],
        script=r["script"],
        workers=r["workers"],
        pack_key=r["pack_key"],
        readme=r["readme"],
        readme_updated_at=r["readme_updated_at"],
        readme_updated_by=r["readme_updated_by"],
        kind=r["kind"],
        image_ref=r["image_ref"],
    )
