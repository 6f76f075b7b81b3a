"""Imagebuild's commands: start a build (from an uploaded folder), edit a readme, delete."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from shipyard_core import validation
from shipyard_core.aggregate import Repository, retry_on_conflict
from shipyard_core.auth import Principal
from shipyard_core.errors import FailedPrecondition, InvalidArgument
from shipyard_core.eventstore import EventStore, StoredEvent
from shipyard_core.objectstore import ObjectStore
from shipyard_core.projections.consistency import wait_until_projected
from shipyard_imagebuild.adapters import envpack, folder
from shipyard_imagebuild.app.queries import ImageQueries
from shipyard_imagebuild.app.refs import parse_ref, resolve_group
from shipyard_imagebuild.app.views import BuildView, ImageView
from shipyard_imagebuild.domain import IMAGEBUILD_EVENTS, Build, ImageRepo
from shipyard_imagebuild.domain.events import BuildQueued, ImageVersionCreated
from shipyard_imagebuild.projections import SCHEMA, CatalogProjection

MAX_README_BYTES = 256 * 1024


@dataclass(frozen=True)
class BuildOptions:
    """What the caller may override for one build."""

    python: str = ""
    skip_dependency_install: bool = False


CacheKey = Callable[[str, str, bool], str]
"""``(source digest, python, install dependencies) -> cache key``: the build backend's."""


def pack_cache_key(source_digest: str, python: str, install_dependencies: bool) -> str:
    """The cache key of environment packs (the local backend's)."""
    return envpack.cache_key(source_digest, python, install_dependencies, envpack.runtime_version())


def host_python() -> str:
    """The builder's own Python (``3.11``): the default environment version."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


class ImageCommands:
    """Start builds, edit readmes, delete versions."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: EventStore,
        objects: ObjectStore,
        queries: ImageQueries,
        *,
        projection_wait_seconds: float = 5.0,
        cache_key: CacheKey = pack_cache_key,
    ) -> None:
        self.pool = pool
        self.cache_key = cache_key
        self.store = store
        self.objects = objects
        self.queries = queries
        self.projection_wait_seconds = projection_wait_seconds
        self.builds = Repository(store, Build, IMAGEBUILD_EVENTS)
        self.repos = Repository(store, ImageRepo, IMAGEBUILD_EVENTS)

    async def start_build(
        self,
        caller: Principal,
        group: str,
        name: str,
        options: BuildOptions,
        upload: Path,
        source_name: str = "",
    ) -> BuildView:
        """Checks the uploaded folder against the contract, then answers from the cache
        (identical inputs) or queues the build."""
        group = resolve_group(caller, group)
        validation.name("name", name)
        if len(source_name) > 500:
            raise InvalidArgument("source_name", "is longer than 500 characters")
        model, source_digest, readme = await asyncio.to_thread(_inspect_upload, upload)
        python = options.python or model.python or host_python()
        install = model.install_dependencies and not options.skip_dependency_install
        # The backend's key: an image of the other backend is never a cache hit.
        key = self.cache_key(source_digest, python, install)
        _, source_key, _ = await self.objects.put_content_addressed(upload, "sources")
        build_id = f"b-{uuid.uuid4().hex[:16]}"
        request = BuildQueued(
            build_id=build_id,
            group=group,
            name=name,
            source_digest=source_digest,
            source_key=source_key,
            source_name=source_name or name,
            python=python,
            install_dependencies=install,
            cache_key=key,
            requested_by=caller.user,
        )

        async def command() -> list[StoredEvent]:
            build = Build(build_id)
            build.queue(request)
            repo = await self.repos.load(f"{group}/{name}")
            cached = repo.cached(key)
            if cached is not None:
                info = repo.versions[cached].created
                build.succeed(cached, info.digest, info.size_bytes, True, 0.0)
                return await self.builds.save(build)
            pack = await self._pack_for(key)
            if pack is not None:  # built under another name: reuse the pack, new version
                version = repo.add_version(
                    pack.model_copy(
                        update={"build_id": build_id, "created_by": caller.user, "readme": readme}
                    )
                )
                build.succeed(version, pack.digest, pack.size_bytes, True, 0.0)
                # The image version first: the catalog projection applies events in order, so
                # whoever sees the build succeeded can already use its image.
                return await self.builds.save(repo, build)
            return await self.builds.save(build)

        events = await retry_on_conflict(command)
        await self._visible(events)
        return await self.queries.build(caller, build_id)

    async def _pack_for(self, key: str) -> ImageVersionCreated | None:
        """A live pack anywhere built from identical inputs (packs only: an OCI image
        lives in its group's registry repository, which another group may not be able to
        pull from, and goes when that repository is cleaned)."""
        row = await self.pool.fetchrow(
            f"SELECT group_name, name, version FROM {CatalogProjection.live_tables()['images']} "
            "WHERE cache_key = $1 AND NOT deleted ORDER BY created_at LIMIT 1",
            key,
        )
        if row is None:
            return None
        repo = await self.repos.load(f"{row['group_name']}/{row['name']}")
        found = repo.versions.get(row["version"])
        if found is None or found.deleted or found.created.kind != "pack":
            return None
        return found.created

    async def set_readme(
        self, caller: Principal, group: str, image: str, markdown: str
    ) -> ImageView:
        """Replaces a version's readme (the latest when no version is given)."""
        group = resolve_group(caller, group)
        name, version = parse_ref(image)
        if len(markdown.encode()) > MAX_README_BYTES:
            raise InvalidArgument("markdown", "is larger than 256 KiB")

        async def command() -> list[StoredEvent]:
            repo = await self.repos.load(f"{group}/{name}")
            repo.set_readme(version or repo.latest(), markdown)
            return await self.repos.save(repo)

        await self._visible(await retry_on_conflict(command))
        return await self.queries.image(caller, group, image)

    async def delete(self, caller: Principal, group: str, image: str) -> None:
        """Deletes a version; refused while a deployment uses it."""
        group = resolve_group(caller, group)
        name, version = parse_ref(image, need_version=True)
        assert version is not None
        users = await self.queries.deployments_using(group, name, version)
        if users:
            raise FailedPrecondition(
                f"image {name}:{version} is used by deployment(s) {', '.join(users)}; "
                "delete or update them first"
            )

        async def command() -> list[StoredEvent]:
            repo = await self.repos.load(f"{group}/{name}")
            repo.delete(version)
            return await self.repos.save(repo)

        await self._visible(await retry_on_conflict(command))

    async def _visible(self, events: list[StoredEvent]) -> None:
        if self.projection_wait_seconds > 0:
            await wait_until_projected(
                self.pool, SCHEMA, CatalogProjection.name, events, self.projection_wait_seconds
            )


def _inspect_upload(upload: Path) -> tuple[folder.ModelFolder, str, str]:
    """Checks an uploaded folder against the contract: (folder, digest, readme)."""
    with tempfile.TemporaryDirectory(prefix="shipyard-upload-") as tmp:
        src = Path(tmp) / "src"
        folder.extract_tarball(upload, src)
        model = folder.inspect_folder(src)
        return model, folder.folder_digest(src), read_readme(src, model.readme)


def read_readme(src: Path, name: str | None) -> str:
    """The folder's readme text (at most 256 KiB), or empty."""
    if not name:
        return ""
    path = src / name
    if not path.is_file():
        return ""
    return path.read_bytes()[:MAX_README_BYTES].decode(errors="replace")
