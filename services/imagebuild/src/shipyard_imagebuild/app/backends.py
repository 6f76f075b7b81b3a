"""Build backends: what turns one queued build into an image version.

The builder (``app/builder.py``) owns the build's life: attempts, heartbeats, the build
log, the events. A backend does the work in between, behind one small interface:

- :class:`LocalPackBackend` (``SHIPYARD_BUILD_BACKEND=local``, the default): an
  environment pack built on this machine and stored in the object store (decision 0015).
- :class:`KanikoBackend` (``SHIPYARD_BUILD_BACKEND=kubernetes``): an OCI image built by a
  Kaniko Job on a cluster from a build context uploaded to the object store, pushed to a
  registry (decision 0029).

Each backend also defines the build cache key, so an image made by one backend is never
answered from the cache to a service running the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from shipyard_core.aggregate import Repository
from shipyard_core.errors import FailedPrecondition, NotFound, ShipyardError, Unavailable
from shipyard_core.objectstore import ObjectStore, sha256_file
from shipyard_imagebuild.adapters import envpack, folder
from shipyard_imagebuild.app.buildlogs import BuildLogWriter
from shipyard_imagebuild.app.commands import pack_cache_key, read_readme
from shipyard_imagebuild.domain import ImageRepo
from shipyard_imagebuild.domain.events import BuildQueued, ImageKind, ImageVersionCreated

if TYPE_CHECKING:
    from shipyard_imagebuild.adapters.kaniko import KanikoBuild, KubernetesBuildRunner
    from shipyard_imagebuild.settings import ImageBuildSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Cluster builds that did not end this long after their Job's own deadline are given up
# (the Job's deadline counts from its start; a pod may wait for a node before that).
_DEADLINE_GRACE_SECONDS = 300.0
# One runner method (one or two Kubernetes API calls) may take this long in all.
# ``kube.call`` bounds each request's connect and read; this bounds the method as a whole,
# so a build is never left "building" (and heartbeating) on a stuck call; its thread is
# abandoned, and the call counts as the API being unavailable.
_API_CALL_SECONDS = 60.0


@dataclass(frozen=True)
class BuildTask:
    """One attempt of one build, as the builder hands it to a backend."""

    request: BuildQueued
    attempt: int
    """1 for the first; 2+ after a builder died during an earlier attempt."""
    work: Path
    """Scratch folder of this attempt (the builder removes it afterwards)."""
    logs: BuildLogWriter
    """The build log: every line a user should see goes here."""


class BuildBackend(Protocol):
    """What the builder needs of a backend."""

    kind: ClassVar[ImageKind]

    def cache_key(self, source_digest: str, python: str, install_dependencies: bool) -> str:
        """The build cache key of these inputs: identical inputs, identical key."""
        ...

    async def make(self, task: BuildTask) -> ImageVersionCreated:
        """Builds the image; the version number is left 0 (the catalog assigns it).
        ``ShipyardError`` is a failed build, its message the reason."""
        ...

    async def cleanup(self, task: BuildTask) -> None:
        """Called once the build's end is recorded (succeeded or failed; not when the
        builder stops mid-build, which is resumed). Never raises."""
        ...


async def fetch_source(
    objects: ObjectStore, request: BuildQueued, work: Path
) -> tuple[Path, folder.ModelFolder, str]:
    """The uploaded model folder unpacked into ``work/src``: (path, folder, readme)."""
    await asyncio.to_thread(_fresh_dir, work)
    tarball = work / "source.tar.gz"
    await objects.get_file(request.source_key, tarball)
    src = work / "src"
    model, readme = await asyncio.to_thread(_unpack, tarball, src)
    return src, model, readme


class LocalPackBackend:
    """Environment packs built on this machine (decision 0015)."""

    kind: ClassVar[ImageKind] = "pack"

    def __init__(
        self,
        objects: ObjectStore,
        *,
        uv_cache_dir: Path,
        runtime_source: Path,
        size_limit_bytes: int,
    ) -> None:
        self.objects = objects
        self.uv_cache_dir = uv_cache_dir
        self.runtime_source = runtime_source
        self.size_limit_bytes = size_limit_bytes

    def cache_key(self, source_digest: str, python: str, install_dependencies: bool) -> str:
        """:func:`envpack.cache_key` with the runtime of this checkout."""
        return pack_cache_key(source_digest, python, install_dependencies)

    async def make(self, task: BuildTask) -> ImageVersionCreated:
        """Builds, checks, packs and stores the environment."""
        request, work, logs = task.request, task.work, task.logs
        src, model, readme = await fetch_source(self.objects, request, work)
        pack = await envpack.build_pack(
            src,
            work / "pack",
            runtime_source=self.runtime_source,
            uv_cache_dir=self.uv_cache_dir,
            python=request.python,
            install_dependencies=request.install_dependencies,
            size_limit_bytes=self.size_limit_bytes,
            log=logs.write,
        )
        digest, key, size = await self.objects.put_content_addressed(pack.path, "packs")
        logs.write(f"stored pack sha256:{digest} ({size} bytes)")
        return version_event(
            request,
            model,
            readme,
            digest=digest,
            size_bytes=size,
            pack_key=key,
            python=pack.python_version,
            packages=list(pack.packages),
        )

    async def cleanup(self, task: BuildTask) -> None:
        """Nothing outlives a local build but its pack."""


class KanikoBackend:
    """OCI images built by Kaniko Jobs on a cluster (decision 0029).

    For each build: the build context (:func:`kaniko.write_context`) is uploaded to the
    object store, the Job is submitted (idempotent: its name is the build id's, so a
    resumed build follows the Job an earlier attempt started), its state and its pod's
    log are read every ``k8s_build_poll_seconds`` (new log lines go to the build log),
    and at its end the pushed image's digest is read from the pod's termination message.
    The Job is deleted once the build's end is recorded. The Kubernetes client is
    synchronous: every call runs in a worker thread.
    """

    kind: ClassVar[ImageKind] = "oci"

    def __init__(
        self,
        settings: ImageBuildSettings,
        objects: ObjectStore,
        runner: KubernetesBuildRunner,
        repos: Repository[ImageRepo],
        *,
        runtime_source: Path,
    ) -> None:
        self.settings = settings
        self.objects = objects
        self.runner = runner
        self.repos = repos
        self.runtime_source = runtime_source
        self.registry = settings.k8s_build_registry.rstrip("/")
        self._wheel: Path | None = settings.runtime_wheel
        self._wheel_lock = asyncio.Lock()
        self._runtime_id: str | None = None

    # ------------------------------------------------------------------ cache

    def cache_key(self, source_digest: str, python: str, install_dependencies: bool) -> str:
        """Inputs of an OCI build: the folder, Python, whether dependencies are installed,
        the runtime, the Dockerfile, the Kaniko image and where images are pushed."""
        from shipyard_imagebuild.adapters.kaniko import dockerfile

        recipe = dockerfile(python, check=install_dependencies)
        payload = json.dumps(
            {
                "format": "oci-kaniko-1",
                "source": source_digest,
                "python": python,
                "install_dependencies": bool(install_dependencies),
                "runtime": self._runtime(),
                "dockerfile": hashlib.sha256(recipe.encode()).hexdigest(),
                "kaniko_image": self.settings.k8s_kaniko_image,
                "registry": self.registry,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def _runtime(self) -> str:
        """The runtime that goes into images: the given wheel's digest, or the version
        and source digest of ``runtime_source``."""
        if self.settings.runtime_wheel is not None:
            if self._runtime_id is None:
                digest, _ = sha256_file(self.settings.runtime_wheel)
                self._runtime_id = f"wheel:{digest}"
            return self._runtime_id
        return envpack.runtime_version(self.runtime_source)

    # ------------------------------------------------------------------ build

    def repository(self, request: BuildQueued) -> str:
        """Where a build's image is pushed: ``<registry>/<group>/<name>``."""
        return f"{self.registry}/{request.group}/{request.name}"

    async def make(self, task: BuildTask) -> ImageVersionCreated:
        """Uploads the context, runs (or follows) the Job, returns the pushed image."""
        request, logs = task.request, task.logs
        src, model, readme = await fetch_source(self.objects, request, task.work)
        wheel = await self._runtime_wheel(logs)
        context = task.work / "context.tar.gz"
        from shipyard_imagebuild.adapters import kaniko

        await asyncio.to_thread(
            kaniko.write_context,
            src,
            wheel,
            context,
            python=request.python,
            install_dependencies=request.install_dependencies,
        )
        _, key, size = await self.objects.put_content_addressed(context, "contexts")
        build = self._kaniko_build(request, self.objects.url(key), await self._expected(request))
        logs.write(f"build context {build.source_url} ({size} bytes)")
        await self._submit(build, task)
        text = await self._follow(build, logs)
        digest = await self._persist(logs, self.runner.image_digest, build.build_id)
        if digest is None:
            raise FailedPrecondition(
                f"the build Job {build.namespace}/{build.job_name} succeeded but its pod "
                "reported no image digest (Kaniko writes it with --digest-file); start the "
                "build again"
            )
        reference = f"{self.repository(request)}@{digest}"
        logs.write(f"pushed {build.destination} as {reference}")
        return version_event(
            request,
            model,
            readme,
            digest=digest.removeprefix("sha256:"),
            size_bytes=0,
            pack_key="",
            python=request.python,
            packages=pip_installed(text.splitlines()),
            kind="oci",
            image_ref=reference,
        )

    def _kaniko_build(self, request: BuildQueued, source_url: str, version: int) -> KanikoBuild:
        from shipyard_imagebuild.adapters.kaniko import KanikoBuild

        s = self.settings
        return KanikoBuild(
            build_id=request.build_id,
            group=request.group,
            name=request.name,
            version=version,
            source_url=source_url,
            # Tagged with the build id: unique and known before the build ends, so a
            # resumed attempt pushes to the same place. The catalog pins the digest.
            destination=f"{self.repository(request)}:{request.build_id}",
            namespace=s.k8s_build_namespace,
            kaniko_image=s.k8s_kaniko_image,
            python=request.python,
            pull_secret=s.k8s_registry_secret or None,
            cpu=s.k8s_build_cpu,
            memory=s.k8s_build_memory,
            timeout_seconds=s.k8s_build_timeout_seconds,
            install_dependencies=request.install_dependencies,
        )

    async def _expected(self, request: BuildQueued) -> int:
        repo = await self.repos.load(f"{request.group}/{request.name}")
        return repo.next_version

    async def _runtime_wheel(self, logs: BuildLogWriter) -> Path:
        """The runtime wheel: the configured one, else built once per runtime version (in
        ``<build_dir>/runtime-wheels/<version>/``, kept for later builds)."""
        async with self._wheel_lock:
            if self._wheel is None:
                version = envpack.runtime_version(self.runtime_source)
                root = self.settings.builds_path() / "runtime-wheels"
                wheel = await asyncio.to_thread(_one_wheel, root / version)
                if wheel is None:
                    logs.write(f"building the shipyard-runtime wheel {version}")
                    wheel = await self._build_wheel(root, version, logs)
                self._wheel = wheel
            return self._wheel

    async def _build_wheel(self, root: Path, version: str, logs: BuildLogWriter) -> Path:
        # Built aside and renamed into place: another builder process on the same data
        # folder sees a whole wheel or none.
        scratch = await asyncio.to_thread(_scratch_dir, root)
        try:
            await envpack.build_runtime_wheel(
                self.runtime_source,
                scratch,
                uv_cache_dir=self.settings.uv_cache_path(),
                log=logs.write,
            )
            return await asyncio.to_thread(_move_into_place, scratch, root / version)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)

    async def _call(self, fn: Callable[..., T], /, *args: Any) -> T:
        """A runner call in a worker thread, given up after ``_API_CALL_SECONDS``."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), _API_CALL_SECONDS)
        except TimeoutError:
            raise Unavailable(
                f"the Kubernetes API did not answer within {_API_CALL_SECONDS:.0f}s"
            ) from None

    async def _persist(
        self, logs: BuildLogWriter, fn: Callable[..., T], /, *args: Any, within: float = 300.0
    ) -> T:
        """A runner call retried while the API is unavailable (a 429, a 5xx, a dropped
        connection), for up to ``within`` seconds: a short outage must not fail a build,
        least of all after Kaniko pushed the image."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay, said = 1.0, ""
        while True:
            try:
                return await self._call(fn, *args)
            except Unavailable as exc:
                if loop.time() + delay > deadline:
                    raise
                if exc.message != said:
                    logs.write(f"{exc.message}; retrying")
                    said = exc.message
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.k8s_build_poll_seconds * 10)

    async def _submit(self, build: KanikoBuild, task: BuildTask) -> None:
        where = f"{build.namespace}/{build.job_name}"
        if task.attempt > 1:
            try:
                state = await self._call(self.runner.status, build.build_id)
            except NotFound:
                pass
            else:
                task.logs.write(
                    f"found Job {where} of an earlier attempt ({state}): following it "
                    "instead of starting another; its log is read from the start"
                )
                # submit() again all the same: it completes a submission that stopped
                # between the Job and its ConfigMap.
                await self._persist(task.logs, self.runner.submit, build)
                return
        await self._persist(task.logs, self.runner.submit, build)
        task.logs.write(f"submitted Job {where}: Kaniko builds and pushes {build.destination}")

    async def _follow(self, build: KanikoBuild, logs: BuildLogWriter) -> str:
        """Polls the Job to its end, copying new pod log lines into the build log; returns
        the pod's whole log. ``FailedPrecondition`` when the build failed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + build.timeout_seconds + _DEADLINE_GRACE_SECONDS
        where = f"{build.namespace}/{build.job_name}"
        copied, text, last_state, outage = 0, "", "", ""
        while True:
            state: str
            try:
                state = await self._call(self.runner.status, build.build_id)
            except NotFound:
                raise FailedPrecondition(
                    f"the build Job {where} disappeared before it finished (deleted by "
                    "someone?); start the build again"
                ) from None
            except Unavailable as exc:
                state = ""
                if exc.message != outage:
                    logs.write(f"{exc.message}; retrying")
                outage = exc.message
            else:
                outage = ""
            if state:
                if state != last_state:
                    logs.write(f"Job {where}: {state}")
                    last_state = state
                text = await self._read_log(build.build_id, text, logs)
                final = state in ("succeeded", "failed")
                new, copied = new_log_lines(text, copied, final=final)
                for line in new:
                    logs.write(line)
                if state == "succeeded":
                    return text
                if state == "failed":
                    raise FailedPrecondition(failure_reason(text, where))
            if loop.time() > deadline:
                raise FailedPrecondition(
                    f"the build Job {where} did not finish within "
                    f"{build.timeout_seconds + _DEADLINE_GRACE_SECONDS:.0f}s; see "
                    f"`kubectl -n {build.namespace} describe job {build.job_name}`"
                )
            await asyncio.sleep(self.settings.k8s_build_poll_seconds)

    async def _read_log(self, build_id: str, previous: str, logs: BuildLogWriter) -> str:
        """The pod's log so far (the previous text when it cannot be read right now)."""
        try:
            text = await self._call(self.runner.logs, build_id)
        except ShipyardError as exc:
            # A pod between "started" and "log readable", or the API briefly away: the
            # next poll reads it. The reason is logged for the operator, not the user.
            log.info("cannot read the log of build %s yet: %s", build_id, exc.message)
            return previous
        return text if len(text) >= len(previous) else previous

    async def cleanup(self, task: BuildTask) -> None:
        """Deletes the build's Job and ConfigMap (and so its pod)."""
        from shipyard_imagebuild.adapters.kaniko import job_name

        where = f"{self.settings.k8s_build_namespace}/{job_name(task.request.build_id)}"
        try:
            await self._call(self.runner.delete, task.request.build_id)
        except ShipyardError as exc:
            task.logs.write(
                f"could not delete Job {where}: {exc.message} (Kubernetes deletes it a day "
                "after it finished)"
            )
            return
        task.logs.write(f"deleted Job {where}")


def version_event(
    request: BuildQueued, model: folder.ModelFolder, readme: str, **made: Any
) -> ImageVersionCreated:
    """The image version a build made: what the request and the model folder say, plus
    what the backend ``made`` (digest, size, pack or image reference, Python, packages).
    The version number is given when it is recorded."""
    return ImageVersionCreated(
        version=0,
        build_id=request.build_id,
        script=model.script,
        workers=model.workers,
        source_digest=request.source_digest,
        source_name=request.source_name,
        cache_key=request.cache_key,
        created_by=request.requested_by,
        readme=readme,
        **made,
    )


def new_log_lines(text: str, copied: int, *, final: bool) -> tuple[list[str], int]:
    """The lines of ``text`` after the first ``copied``, and the new count. A last line
    without its newline is still being written: it waits, unless the log is ``final``."""
    lines = text.splitlines(keepends=True)
    if not final and lines and not lines[-1].endswith(("\n", "\r")):
        lines.pop()
    if len(lines) <= copied:
        return [], copied
    return [line.rstrip("\r\n") for line in lines[copied:]], len(lines)


def failure_reason(text: str, where: str) -> str:
    """Why a Kaniko build failed, from its log: the model check's verdict when the check
    step failed (the same reason a local build gives), else the log's last line."""
    lines = text.splitlines()
    _, verdict = envpack.parse_check(lines)
    if verdict is not None and not verdict.get("ok"):
        stage = verdict.get("stage", "?")
        error = verdict.get("error") or "the check failed"
        fix = verdict.get("fix") or "see the build log for the traceback"
        return f"model check failed at stage {stage}: {error} ({fix})"
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    if last:
        return f"the image build failed: {last[:500]} (the build log has Kaniko's output)"
    return (
        f"the build Job {where} failed without a log (its deadline passed or its pod "
        f"could not start; `kubectl describe job` in the build namespace says why)"
    )


def pip_installed(lines: list[str]) -> list[tuple[str, str]]:
    """The packages of pip's last ``Successfully installed a-1.0 b-2.0`` line, sorted (the
    packages the Dockerfile's install step added to the base image)."""
    for line in reversed(lines):
        _, marker, rest = line.partition("Successfully installed ")
        if marker:
            found = []
            for item in rest.split():
                name, sep, version = item.rpartition("-")
                if sep and name:
                    found.append((name, version))
            return sorted(found)
    return []


def make_backend(
    settings: ImageBuildSettings,
    objects: ObjectStore,
    repos: Repository[ImageRepo],
    *,
    runtime_source: Path,
    api_client: Any = None,
) -> BuildBackend:
    """The backend ``settings.build_backend`` names (``api_client``: the Kubernetes client
    of the kubernetes backend)."""
    if settings.build_backend == "kubernetes":
        from shipyard_imagebuild.adapters.kaniko import KubernetesBuildRunner

        if api_client is None:
            raise FailedPrecondition("the kubernetes build backend needs a Kubernetes client")
        runner = KubernetesBuildRunner(api_client, settings.k8s_build_namespace)
        return KanikoBackend(settings, objects, runner, repos, runtime_source=runtime_source)
    return LocalPackBackend(
        objects,
        uv_cache_dir=settings.uv_cache_path(),
        runtime_source=runtime_source,
        size_limit_bytes=settings.image_size_limit_bytes,
    )


def _one_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("shipyard_runtime-*.whl"))
    return wheels[0] if len(wheels) == 1 else None


def _scratch_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=".build-"))


def _move_into_place(scratch: Path, target: Path) -> Path:
    with contextlib.suppress(OSError):  # another process put its wheel there first
        os.replace(scratch, target)
    wheel = _one_wheel(target)
    if wheel is None:
        raise FailedPrecondition(f"the shipyard-runtime wheel did not arrive in {target}")
    return wheel


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _unpack(tarball: Path, src: Path) -> tuple[folder.ModelFolder, str]:
    folder.extract_tarball(tarball, src)
    model = folder.inspect_folder(src)
    return model, read_readme(src, model.readme)
