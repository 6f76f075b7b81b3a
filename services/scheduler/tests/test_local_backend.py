"""The ``local`` runtime backend for real: a real environment pack built once per module,
a real ``file://`` object store, real model server processes, real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shipyard_core.errors import InvalidArgument
from shipyard_core.objectstore import FileStore, ObjectStore, open_store
from shipyard_imagebuild.adapters.envpack import build_pack
from shipyard_scheduler.adapters.backend import InstancePhase, ObservedInstance, RevisionSpec
from shipyard_scheduler.adapters.local import LocalBackend
from shipyard_testing import wait_for

# Standard library only, so the pack builds without installing anything but the runtime.
# TEST_FAIL_LOAD in the instance's environment makes load() raise: one pack serves both
# the healthy and the crash-looping cases.
SERVE = """\
import os


def load(model_dir):
    print(f"loading the model of {os.environ['SHIPYARD_INSTANCE_ID']}", flush=True)
    failure = os.environ.get("TEST_FAIL_LOAD")
    if failure:
        raise RuntimeError(failure)
    return {"offset": 100}


def predict(model, payload):
    # The worker's parent is the instance's process: tells replicas apart.
    return {"sums": [sum(row) + model["offset"] for row in payload], "pid": os.getppid()}
"""

READY = InstancePhase.READY
# Generous: model servers start in well under a second, but CI machines are slow.
START_TIMEOUT = 30.0


class CountingStore(FileStore):
    """A real file store that counts the packs it hands out."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets = 0

    async def get_file(self, key: str, path: Path) -> int:
        self.gets += 1
        return await super().get_file(key, path)


@pytest.fixture(scope="module")
async def pack_spec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RevisionSpec]:
    """The echo model built into a pack and stored; returns the store's root and a spec."""
    folder = tmp_path_factory.mktemp("model") / "echo"
    folder.mkdir()
    (folder / "serve.py").write_text(SERVE)
    result = await build_pack(
        folder,
        tmp_path_factory.mktemp("build"),
        uv_cache_dir=tmp_path_factory.mktemp("uv-cache"),
        install_dependencies=False,
        log=lambda _line: None,
    )
    store_root = tmp_path_factory.mktemp("objects")
    store: ObjectStore = open_store(f"file://{store_root}")
    digest, key, _size = await store.put_content_addressed(result.path, "images/echo")
    spec = RevisionSpec(
        deployment="echo",
        group="team-a",
        revision=1,
        replicas=1,
        image="echo:1",
        image_digest=digest,
        pack_key=key,
        workers=1,
        instance_type="cpu.small",
        cpu=0.5,
        memory_gib=0.5,
        gpu=0,
    )
    return store_root, spec


@pytest.fixture
def store(pack_spec: tuple[Path, RevisionSpec]) -> CountingStore:
    return CountingStore(pack_spec[0])


@pytest.fixture
def spec(pack_spec: tuple[Path, RevisionSpec]) -> RevisionSpec:
    return pack_spec[1]


BackendFactory = Callable[[], LocalBackend]


@pytest.fixture
async def backends(store: CountingStore, tmp_path: Path) -> AsyncIterator[BackendFactory]:
    """Makes backends on one root (as successive schedulers would); every process they
    started is stopped afterwards, whatever the test did."""
    made: list[LocalBackend] = []

    def make() -> LocalBackend:
        backend = LocalBackend(
            store,
            tmp_path / "root",
            grace_seconds=5.0,
            initial_backoff=0.2,
            max_backoff=0.8,
            health_interval=0.1,
        )
        made.append(backend)
        return backend

    yield make
    # Newest first: it holds the adopted instances; older ones were closed.
    for backend in reversed(made):
        await backend.shutdown_all()
        await backend.close()


@pytest.fixture
async def backend(backends: BackendFactory) -> LocalBackend:
    backend = backends()
    await backend.open()
    return backend


async def _infer(address: str, deployment: str, rows: list[list[float]]) -> dict[str, Any]:
    """An Open Inference Protocol v2 request over a plain HTTP/1.1 connection."""
    host, port = address.rsplit(":", 1)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [len(rows), 2], "datatype": "FP64", "data": rows}]}
    ).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /v2/models/{deployment}/infer HTTP/1.1\r\nHost: {address}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", response
    result = json.loads(payload)
    assert isinstance(result, dict)
    return {output["name"]: output["data"] for output in result["outputs"]}


async def _ready(backend: LocalBackend, count: int) -> list[ObservedInstance]:
    async def check() -> list[ObservedInstance]:
        seen = await backend.observe()
        ready = [i for i in seen if i.phase is READY]
        return ready if len(ready) == count and len(seen) == count else []

    return await wait_for(
        check, timeout=START_TIMEOUT, message=f"{count} ready instances", interval=0.02
    )


def _gone(pid: int) -> bool:
    """True when no process of the group ``pid`` (the instance and its workers) is left."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _proc_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def test_replicas_serve_predictions_and_scale_down(
    backend: LocalBackend, spec: RevisionSpec, store: CountingStore
) -> None:
    two = replace(spec, replicas=2)
    await backend.apply(two)
    await backend.apply(two)  # idempotent: still two
    first = await backend.observe()
    assert len(first) == 2
    assert all(i.phase in (InstancePhase.PENDING, InstancePhase.STARTING, READY) for i in first)
    ready = await _ready(backend, 2)
    assert {i.instance_id for i in ready} == {i.instance_id for i in first}
    for inst in ready:
        assert inst.instance_id.startswith("echo-r1-") and len(inst.instance_id) == 13
        assert (inst.deployment, inst.revision, inst.restarts, inst.message) == ("echo", 1, 0, "")
    # Both answer, each from its own process.
    pids = set()
    for inst in ready:
        outputs = await _infer(inst.address, "echo", [[1, 2], [3, 4]])
        assert outputs["sums"] == [103, 107]
        pids.add(outputs["pid"][0])
    assert pids == {backend.pid(i.instance_id) for i in ready}
    # Two instances, one image: fetched and unpacked once.
    assert store.gets == 1
    assert [p.name for p in (backend.root / "images").iterdir()] == [spec.image_digest]

    await backend.apply(replace(spec, replicas=1))
    after = await backend.observe()
    live = [i for i in after if i.phase is not InstancePhase.TERMINATED]
    assert len(live) == 1
    (stopped_id,) = {i.instance_id for i in ready} - {live[0].instance_id}
    stopped_pid = next(p for p in pids if p != backend.pid(live[0].instance_id))
    await wait_for(
        lambda: (
            _gone(stopped_pid) and not (backend.root / "instances" / f"{stopped_id}.json").exists()
        ),
        timeout=10,
        message="the extra instance to stop",
    )

    async def one_left() -> bool:
        return [i.instance_id for i in await backend.observe()] == [live[0].instance_id]

    await wait_for(one_left, timeout=10, message="the stopped instance to disappear")
    # The survivor was not disturbed.
    await _ready(backend, 1)


async def test_concurrent_revisions_of_one_image_unpack_it_once(
    backend: LocalBackend, spec: RevisionSpec, store: CountingStore
) -> None:
    await asyncio.gather(
        backend.apply(replace(spec, revision=1)),
        backend.apply(replace(spec, revision=2)),
        backend.apply(replace(spec, deployment="other", revision=7)),
    )
    ready = await _ready(backend, 3)
    assert {(i.deployment, i.revision) for i in ready} == {("echo", 1), ("echo", 2), ("other", 7)}
    assert store.gets == 1
    # Only the image itself is left under images/: no temporary files.
    assert [p.name for p in (backend.root / "images").iterdir()] == [spec.image_digest]


async def test_a_failing_load_crash_loops_with_backoff(
    backend: LocalBackend, spec: RevisionSpec
) -> None:
    broken = replace(spec, env={"TEST_FAIL_LOAD": "the weights file is corrupt"})
    await backend.apply(broken)

    async def failed() -> ObservedInstance | None:
        (inst,) = await backend.observe()
        return inst if inst.phase is InstancePhase.FAILED else None

    inst = await wait_for(failed, timeout=START_TIMEOUT, message="the instance to fail")
    assert inst.message.startswith("exited with code 1 (next restart in 0.2s)"), inst.message
    # The exception and the model's own print, from the log.
    assert "RuntimeError: the weights file is corrupt" in inst.message
    assert f"loading the model of {inst.instance_id}" in inst.message
    assert inst.address == "" or inst.address.startswith("127.0.0.1:")

    # 0.2 s, 0.4 s, then capped at 0.8 s: the restarts slow down.
    async def capped() -> ObservedInstance | None:
        (inst,) = await backend.observe()
        ok = inst.phase is InstancePhase.FAILED and "next restart in 0.8s" in inst.message
        return inst if ok else None

    inst = await wait_for(capped, timeout=START_TIMEOUT, message="the backoff to reach its cap")
    assert inst.restarts >= 2
    assert (await backend.observe())[0].instance_id == inst.instance_id


async def test_a_killed_instance_is_restarted(backend: LocalBackend, spec: RevisionSpec) -> None:
    await backend.apply(spec)
    (inst,) = await _ready(backend, 1)
    pid = backend.pid(inst.instance_id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    async def failed() -> ObservedInstance | None:
        (seen,) = await backend.observe()
        return seen if seen.phase is InstancePhase.FAILED else None

    seen = await wait_for(failed, timeout=10, message="the kill to be noticed")
    assert seen.message.startswith("killed by signal SIGKILL"), seen.message
    # Its workers went with it.
    await wait_for(lambda: _gone(pid), timeout=10, message="the old process group to be gone")

    (again,) = await _ready(backend, 1)
    assert again.instance_id == inst.instance_id
    assert again.restarts == 1 and again.message == ""
    new_pid = backend.pid(inst.instance_id)
    assert new_pid is not None and new_pid != pid
    outputs = await _infer(again.address, "echo", [[1, 1]])
    assert outputs["pid"] == [new_pid]


async def test_a_new_backend_adopts_running_instances(
    backends: BackendFactory, spec: RevisionSpec
) -> None:
    first = backends()
    await first.open()
    await first.apply(replace(spec, replicas=2))
    ready = await _ready(first, 2)
    pids = {i.instance_id: first.pid(i.instance_id) for i in ready}
    await first.close()
    assert await first.observe() == []

    # One of them dies while no scheduler runs.
    dead_id, kept_id = sorted(pids)
    dead_pid, kept_pid = pids[dead_id], pids[kept_id]
    assert dead_pid is not None and kept_pid is not None
    os.killpg(dead_pid, signal.SIGKILL)
    # Still serving without a supervisor.
    kept = next(i for i in ready if i.instance_id == kept_id)
    assert (await _infer(kept.address, "echo", [[0, 0]]))["sums"] == [100]

    second = backends()
    await second.open()
    ready = await _ready(second, 2)
    by_id = {i.instance_id: i for i in ready}
    assert set(by_id) == set(pids)
    # The survivor is the same process, not a restart.
    assert second.pid(kept_id) == kept_pid
    assert by_id[kept_id].restarts == 0 and by_id[kept_id].address == kept.address
    # The dead one was started again, and that counts.
    assert second.pid(dead_id) not in (None, dead_pid)
    assert by_id[dead_id].restarts == 1

    await second.remove("echo", 1)
    assert await second.observe() == []
    assert _gone(kept_pid)


async def test_remove_stops_the_process_and_forgets_it(
    backend: LocalBackend, spec: RevisionSpec
) -> None:
    await backend.apply(spec)
    (inst,) = await _ready(backend, 1)
    pid = backend.pid(inst.instance_id)
    assert pid is not None
    state = backend.root / "instances" / f"{inst.instance_id}.json"
    saved = json.loads(state.read_text())
    assert (saved["pid"], saved["deployment"], saved["revision"]) == (pid, "echo", 1)
    assert saved["image_digest"] == spec.image_digest and saved["spec_key"] == "echo-r1"

    await backend.remove("echo", 1)
    assert _gone(pid)
    assert not _proc_exists(pid)  # reaped, not left a zombie
    assert not state.exists()
    assert await backend.observe() == []
    assert backend.pid(inst.instance_id) is None
    # Again, and unknown revisions: no-ops.
    await backend.remove("echo", 1)
    await backend.remove("nope", 3)
    # The log stays for log shipping.
    assert backend.log_path(inst.instance_id).is_file()


async def test_logs_tail_returns_what_the_model_printed(
    backend: LocalBackend, spec: RevisionSpec
) -> None:
    await backend.apply(spec)
    (inst,) = await _ready(backend, 1)
    line = f"loading the model of {inst.instance_id}"
    tail = await wait_for(
        lambda: backend.logs_tail(inst.instance_id, 50), timeout=10, message="a log"
    )
    assert line in tail.splitlines(), tail
    assert tail.endswith("\n")
    assert "shipyard-runtime listening on 127.0.0.1:" in tail
    last = await backend.logs_tail(inst.instance_id, 1)
    assert last.count("\n") == 1 and last == tail.splitlines(keepends=True)[-1]
    assert await backend.logs_tail(inst.instance_id, 0) == ""
    assert await backend.logs_tail("echo-r1-nope0") == ""
    assert await backend.logs_tail("../../etc/passwd") == ""
    assert backend.log_path(inst.instance_id) == backend.root / "logs" / f"{inst.instance_id}.log"


async def test_a_missing_pack_fails_the_start_and_is_retried(
    backend: LocalBackend, spec: RevisionSpec
) -> None:
    with pytest.raises(InvalidArgument, match="image_digest"):
        await backend.apply(replace(spec, image_digest="not-a-digest"))
    with pytest.raises(InvalidArgument, match="replicas"):
        await backend.apply(replace(spec, replicas=-1))
    missing = replace(spec, image_digest="0" * 64, pack_key="images/echo/sha256/" + "0" * 64)
    await backend.apply(missing)

    async def retried() -> ObservedInstance | None:
        (inst,) = await backend.observe()
        return inst if inst.phase is InstancePhase.FAILED and inst.restarts >= 2 else None

    inst = await wait_for(retried, timeout=10, message="failed starts to be retried")
    assert inst.message.startswith(
        "could not start: the environment pack of image echo:1 (images/echo/sha256/000"
    ), inst.message
    assert "is not in the object store" in inst.message
    assert backend.pid(inst.instance_id) is None
    assert list((backend.root / "images").iterdir()) == []


async def test_an_oci_revision_fails_its_instances_saying_why(
    backend: LocalBackend, spec: RevisionSpec, store: CountingStore
) -> None:
    # The scheduler refuses OCI images on this backend; one made while it ran the
    # kubernetes backend reaches it only after a switch, and then fails saying so.
    oci = replace(
        spec,
        image_kind="oci",
        image_ref=f"registry.example/team-a/echo@sha256:{'ab' * 32}",
        image_digest="ab" * 32,
        pack_key="",
    )
    await backend.apply(oci)

    async def failed() -> ObservedInstance | None:
        (inst,) = await backend.observe()
        return inst if inst.phase is InstancePhase.FAILED else None

    inst = await wait_for(failed, timeout=10, message="the OCI instance to fail")
    assert inst.message.startswith(
        "could not start: image echo:1 is a container image built for a cluster (kind oci); "
        "the local runtime runs environment packs"
    ), inst.message
    assert "runtime_backend=kubernetes" in inst.message
    assert store.gets == 0 and backend.pid(inst.instance_id) is None


async def test_shutdown_all_without_open_stops_what_the_state_files_name(
    backends: BackendFactory, spec: RevisionSpec
) -> None:
    first = backends()
    await first.open()
    await first.apply(replace(spec, replicas=2))
    ready = await _ready(first, 2)
    pids = [first.pid(i.instance_id) for i in ready]
    await first.close()

    # What `shipyard down` does: a fresh backend on the same root, not opened.
    down = backends()
    await down.shutdown_all()
    for pid in pids:
        assert pid is not None and _gone(pid)
    assert list((down.root / "instances").iterdir()) == []


async def test_a_reused_pid_is_not_adopted(backends: BackendFactory, spec: RevisionSpec) -> None:
    first = backends()
    await first.open()
    await first.apply(spec)
    (inst,) = await _ready(first, 1)
    pid = first.pid(inst.instance_id)
    assert pid is not None
    await first.close()
    os.killpg(pid, signal.SIGKILL)
    # Another process now has "its" pid: same pid in the state file, other start time.
    other = subprocess.Popen(["sleep", "60"])  # noqa: ASYNC220, S607
    try:
        state = first.root / "instances" / f"{inst.instance_id}.json"
        saved = json.loads(state.read_text())
        saved["pid"] = other.pid
        state.write_text(json.dumps(saved))

        second = backends()
        await second.open()
        (again,) = await _ready(second, 1)
        assert again.instance_id == inst.instance_id and again.restarts == 1
        assert second.pid(inst.instance_id) not in (None, pid, other.pid)
        await second.remove("echo", 1)
        assert other.poll() is None, "the unrelated process was signalled"
    finally:
        other.kill()
        other.wait()


async def test_prefetch_unpacks_and_compiles_before_any_instance(
    backend: LocalBackend, spec: RevisionSpec, store: CountingStore
) -> None:
    assert await backend.prefetch(spec.image, spec.image_digest, spec.pack_key) is True
    env = backend.root / "images" / spec.image_digest.removeprefix("sha256:")
    assert (env / ".shipyard-compiled").is_file()
    # The runtime every instance imports is compiled already (not by a first import:
    # no instance ran).
    compiled = list(env.glob("lib/python*/site-packages/shipyard_runtime/__pycache__/*.pyc"))
    assert any(p.name.startswith("server.") for p in compiled), compiled
    assert await backend.observe() == []
    assert await backend.prefetch(spec.image, spec.image_digest, spec.pack_key) is False
    assert store.gets == 1
    # A deployment of it fetches nothing more.
    await backend.apply(spec)
    await _ready(backend, 1)
    assert store.gets == 1


async def test_phase_changes_wake_whoever_registered(
    backend: LocalBackend, spec: RevisionSpec
) -> None:
    seen: list[set[InstancePhase]] = []

    async def phases() -> set[InstancePhase]:
        return {i.phase for i in await backend.observe()}

    woken = asyncio.Event()

    def wake() -> None:
        woken.set()

    backend.on_change(wake)
    await backend.apply(spec)
    # Every wake-up is followed by a look, until the instance is ready: readiness is
    # announced, not found by polling.
    while READY not in (seen[-1] if seen else set()):
        await asyncio.wait_for(woken.wait(), START_TIMEOUT)
        woken.clear()
        seen.append(await phases())
    assert seen[-1] == {READY}


async def test_prune_keeps_images_in_use_and_the_most_recent(
    backend: LocalBackend, spec: RevisionSpec
) -> None:
    await backend.apply(spec)
    await _ready(backend, 1)
    images = backend.root / "images"
    in_use = spec.image_digest.removeprefix("sha256:")
    # Three more unpacked images no instance uses, oldest first.
    for n, digest in enumerate(("1" * 64, "2" * 64, "3" * 64)):
        (images / digest / "bin").mkdir(parents=True)
        os.utime(images / digest, (1000 + n, 1000 + n))
    assert await backend.prune_images(keep=1) == ["2" * 64, "1" * 64]
    assert sorted(p.name for p in images.iterdir()) == sorted([in_use, "3" * 64])
    # Protected (a deployment scaled to zero uses it): kept with no instance.
    assert await backend.prune_images(keep=0, protect=frozenset({"sha256:" + "3" * 64})) == []
    assert await backend.prune_images(keep=0) == ["3" * 64]
    assert [p.name for p in images.iterdir()] == [in_use]  # its instance still runs
    await backend.remove(spec.deployment, spec.revision)
    assert await backend.prune_images(keep=0) == [in_use]
    assert list(images.iterdir()) == []
    # Closed (not leading), it cannot know what runs: it prunes nothing.
    (images / ("4" * 64) / "bin").mkdir(parents=True)
    await backend.close()
    assert await backend.prune_images(keep=0) == []
    assert [p.name for p in images.iterdir()] == ["4" * 64]
