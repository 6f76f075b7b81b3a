"""Deployments end to end on real PostgreSQL, NATS, quota, imagebuild and model server
processes (the local backend)."""

from __future__ import annotations

import json
import tempfile
import urllib.request
import uuid
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
from kubernetes import client as k8s

from shipyard.imagebuild.v1 import imagebuild_pb2 as ib
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc
from shipyard.quota.v1 import quota_pb2 as qp
from shipyard.quota.v1 import quota_pb2_grpc
from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard.scheduler.v1 import scheduler_pb2_grpc
from shipyard_core import db
from shipyard_core.aggregate import Repository
from shipyard_core.auth import InternalTokenAuthenticator
from shipyard_core.embedded import start_nats
from shipyard_core.embedded.postgres import PostgresProcess
from shipyard_core.eventstore import EventStore
from shipyard_imagebuild.domain import IMAGEBUILD_EVENTS, IMAGEBUILD_UPCASTERS, ImageRepo
from shipyard_imagebuild.domain.events import ImageVersionCreated
from shipyard_imagebuild.projections import SCHEMA as IMAGEBUILD_SCHEMA
from shipyard_scheduler.adapters.kubernetes import KubernetesBackend
from shipyard_scheduler.main import build_scheduler
from shipyard_scheduler.settings import SchedulerSettings
from shipyard_testing import StaticAuthenticator, wait_for
from shipyard_testing.fake_kube import FakeKubeAPI, serve

from .conftest import INTERNAL, SERVE, TOKENS, Stack, build_image, md

DEPLOYED = pb.DEPLOYMENT_STATUS_DEPLOYED


async def _status(
    stub: scheduler_pb2_grpc.SchedulerServiceStub, name: str, want: int, deadline: float = 60
) -> pb.Deployment:
    async def check() -> pb.Deployment | None:
        d = await stub.GetDeployment(pb.DeploymentRef(name=name), metadata=md("ana"))
        return d if d.status == want else None

    return await wait_for(
        check, timeout=deadline, interval=0.1, message=f"{name} never got status {want}"
    )


def _predict(address: str, payload: object) -> dict[str, object]:
    req = urllib.request.Request(
        f"http://{address}/predict",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


async def _used_instances(stack: Stack, want: int, group: str = "team-a") -> int:
    """The group's used instances once they equal ``want`` (quota's usage is a projection)."""

    async def used() -> bool:
        async with grpc.aio.insecure_channel(stack.quota.address) as ch:
            usage = await quota_pb2_grpc.QuotaServiceStub(ch).GetGroupUsage(
                qp.GetGroupUsageRequest(group=group), metadata=md("admin")
            )
            return usage.used.instances == want

    await wait_for(used, timeout=10, interval=0.05, message=f"quota never showed {want} used")
    return want


async def test_create_serves_then_stop_start_delete(stack: Stack) -> None:
    async with stack.channel() as ch:
        stub = stack.stub(ch)
        created = await stub.CreateDeployment(
            pb.CreateDeploymentRequest(
                name="echo-life",
                spec=pb.DeploymentSpec(
                    image=stack.images["v1"],
                    instance_type="cpu.small",
                    scaling=pb.Scaling(min_replicas=2, max_replicas=2),
                    description="an echo",
                    metadata={"team": "a"},
                ),
                readme="# Echo",
            ),
            metadata=md("ana"),
        )
        assert created.group == "team-a" and created.revision == 1
        assert created.status == pb.DEPLOYMENT_STATUS_DEPLOYING
        assert created.endpoint.endswith("/deployments/echo-life/predict")
        await _used_instances(stack, 2)

        deployed = await _status(stub, "echo-life", DEPLOYED)
        assert deployed.ready_replicas == 2
        instances = (
            await stub.ListInstances(pb.ListInstancesRequest(name="echo-life"), metadata=md("ana"))
        ).instances
        ready = [i for i in instances if i.status == pb.INSTANCE_STATUS_READY]
        assert len(ready) == 2 and all(i.backend == "local" for i in ready)
        assert _predict(ready[0].address, [1, 2]) == {"version": "v1", "echo": [1, 2]}

        # Bob (team-b) sees nothing of it and cannot touch it.
        for call in (stub.GetDeployment, stub.StopDeployment, stub.DeleteDeployment):
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await call(pb.DeploymentRef(name="echo-life"), metadata=md("bob"))
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.ListDeployments(pb.ListDeploymentsRequest(), metadata=md("bob"))
        assert [d.name for d in listed.deployments] == []

        stopped = await stub.StopDeployment(pb.DeploymentRef(name="echo-life"), metadata=md("ana"))
        assert stopped.status == pb.DEPLOYMENT_STATUS_STOPPED
        await _used_instances(stack, 0)

        async def all_terminated() -> bool:
            got = await stub.ListInstances(
                pb.ListInstancesRequest(name="echo-life"), metadata=md("ana")
            )
            return all(i.status == pb.INSTANCE_STATUS_TERMINATED for i in got.instances)

        await wait_for(all_terminated, timeout=30, message="instances kept running after stop")

        await stub.StartDeployment(pb.DeploymentRef(name="echo-life"), metadata=md("ana"))
        await _used_instances(stack, 2)
        await _status(stub, "echo-life", DEPLOYED)

        await stub.DeleteDeployment(pb.DeploymentRef(name="echo-life"), metadata=md("ana"))
        await _used_instances(stack, 0)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.GetDeployment(pb.DeploymentRef(name="echo-life"), metadata=md("ana"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        history = await stub.GetHistory(pb.DeploymentRef(name="echo-life"), metadata=md("ana"))
        assert [e.action for e in history.entries] == ["delete", "start", "stop", "create"]
        assert history.entries[-1].actor == "ana" and history.entries[-1].image.version >= 1
        assert history.entries[2].stopped and not history.entries[1].stopped
        assert history.entries[-1].metadata == {"team": "a"}
        await wait_for(all_terminated, timeout=30, message="instances kept running after delete")


async def test_quota_refusal_leaves_nothing_behind(stack: Stack) -> None:
    async with stack.channel() as ch:
        stub = stack.stub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateDeployment(
                pb.CreateDeploymentRequest(
                    name="too-big",
                    spec=pb.DeploymentSpec(
                        image=stack.images["v1"],
                        instance_type="cpu.small",
                        scaling=pb.Scaling(min_replicas=1, max_replicas=9),
                    ),
                ),
                metadata=md("ana"),
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "team-a" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetDeployment(pb.DeploymentRef(name="too-big"), metadata=md("ana"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        await _used_instances(stack, 0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Bad_Name"}, "name"),
        ({"instance_type": "gpu.huge"}, "instance_type"),
        ({"image": "nope:1"}, "image"),
        ({"scaling": pb.Scaling(min_replicas=3, max_replicas=1)}, "min_replicas"),
    ],
)
async def test_bad_input_names_the_field(
    stack: Stack, change: dict[str, object], field: str
) -> None:
    spec = {"image": stack.images["v1"], "instance_type": "cpu.small"}
    name = str(change.pop("name", "ok-name"))
    spec.update(change)  # type: ignore[arg-type]
    async with stack.channel() as ch:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stack.stub(ch).CreateDeployment(
                pb.CreateDeploymentRequest(name=name, spec=pb.DeploymentSpec(**spec)),  # type: ignore[arg-type]
                metadata=md("ana"),
            )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (bad.value.details() or "").startswith(field), bad.value.details()


async def test_a_crashing_revision_fails_with_its_log_and_the_old_one_keeps_serving(
    stack: Stack,
) -> None:
    async with stack.channel() as ch:
        stub = stack.stub(ch)
        await stub.CreateDeployment(
            pb.CreateDeploymentRequest(
                name="echo-crash",
                spec=pb.DeploymentSpec(image=stack.images["v1"], instance_type="cpu.small"),
            ),
            metadata=md("ana"),
        )
        await _status(stub, "echo-crash", DEPLOYED)
        updated = await stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                name="echo-crash", image=stack.images["crash"], message="try crashy"
            ),
            metadata=md("ana"),
        )
        assert updated.revision == 2 and updated.active_revision == 1
        failed = await _status(stub, "echo-crash", pb.DEPLOYMENT_STATUS_FAILED)
        assert "expected 4 features, got 3" in failed.message
        assert "revision 1 still serves" in failed.message
        assert failed.active_revision == 1 and failed.ready_replicas == 1
        history = await stub.GetHistory(pb.DeploymentRef(name="echo-crash"), metadata=md("ana"))
        assert history.entries[0].action == "update" and history.entries[0].message == "try crashy"
        await stub.DeleteDeployment(pb.DeploymentRef(name="echo-crash"), metadata=md("ana"))


async def test_image_usage_follows_deployments_and_guards_delete(stack: Stack) -> None:
    from shipyard.imagebuild.v1 import imagebuild_pb2 as ib
    from shipyard.imagebuild.v1 import imagebuild_pb2_grpc

    v1, v2 = stack.images["v1"], stack.images["v2"]
    async with stack.channel() as ch, grpc.aio.insecure_channel(stack.imagebuild.address) as ich:
        stub, images = stack.stub(ch), imagebuild_pb2_grpc.ImageBuildServiceStub(ich)

        async def users(image: str) -> list[str]:
            got = await images.GetImageUsage(
                ib.GetImageUsageRequest(image=image), metadata=md("ana")
            )
            return list(got.deployments)

        await stub.CreateDeployment(
            pb.CreateDeploymentRequest(
                name="echo-usage", spec=pb.DeploymentSpec(image=v1, instance_type="cpu.small")
            ),
            metadata=md("ana"),
        )
        await wait_for(lambda: _eq(users(v1), ["echo-usage"]), timeout=10, message="usage of v1")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await images.DeleteImage(ib.DeleteImageRequest(image=v1), metadata=md("ana"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "echo-usage" in (refused.value.details() or "")

        await stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(name="echo-usage", image=v2), metadata=md("ana")
        )
        await _status(stub, "echo-usage", DEPLOYED)
        await wait_for(
            lambda: _eq(users(v1), []), timeout=10, message="v1 still in use after rollout"
        )
        assert await users(v2) == ["echo-usage"]
        await stub.DeleteDeployment(pb.DeploymentRef(name="echo-usage"), metadata=md("ana"))
        await wait_for(
            lambda: _eq(users(v2), []), timeout=10, message="v2 still in use after delete"
        )


async def _eq(got: object, want: object) -> bool:
    return await got == want  # type: ignore[misc]


async def test_a_new_image_is_unpacked_before_its_first_deployment(stack: Stack) -> None:
    """The scheduler prefetches each image as it is built: unpacked and compiled to
    bytecode on this machine before anyone deploys it."""
    image = await build_image(
        stack.imagebuild.address, "fresh", {"serve.py": SERVE, "VERSION": "prefetched"}
    )
    async with grpc.aio.insecure_channel(stack.imagebuild.address) as ch:
        got = await imagebuild_pb2_grpc.ImageBuildServiceStub(ch).GetImage(
            ib.GetImageRequest(image=image), metadata=md("ana")
        )
    env = stack.settings.runtime_path() / "images" / got.digest.removeprefix("sha256:")
    await wait_for(lambda: (env / ".shipyard-compiled").is_file(), timeout=60, message="prefetch")
    assert (env / "model" / "VERSION").read_text().strip() == "prefetched"


# --------------------------------------------------------------------------- OCI images

REGISTRY = "registry.example/shipyard"
OCI_DIGEST = "5e" * 32


async def _record_oci_image(stack: Stack, name: str, group: str = "team-a") -> ib.Image:
    """An image version as a cluster build records it (kind oci, a reference pinned by
    digest, no pack), written through imagebuild's own domain (``ImageRepo`` and its
    event store, as its builder does when a Kaniko Job succeeds), and read back over
    imagebuild's gRPC once its catalog shows it.

    Not a real cluster build: this stack's imagebuild builds packs (build_backend=local),
    and a Kaniko build needs a cluster, a registry and S3 (imagebuild's
    test_cluster_builds.py runs one against a fake API server)."""
    pool = await db.create_pool(stack.database_url, max_size=2)
    try:
        repos = Repository(
            EventStore(pool, IMAGEBUILD_SCHEMA, IMAGEBUILD_UPCASTERS), ImageRepo, IMAGEBUILD_EVENTS
        )
        repo = await repos.load(f"{group}/{name}")
        version = repo.add_version(
            ImageVersionCreated(
                version=0,
                build_id=f"b-{uuid.uuid4().hex[:16]}",
                digest=OCI_DIGEST,
                size_bytes=0,
                pack_key="",
                python="3.11",
                packages=[("shipyard-runtime", "0.1.0")],
                script="serve.py",
                workers=2,
                source_digest="sha256:" + "0f" * 32,
                source_name=f"./{name}",
                cache_key=uuid.uuid4().hex,
                created_by="ana",
                readme="",
                kind="oci",
                image_ref=f"{REGISTRY}/{group}/{name}@sha256:{OCI_DIGEST}",
            )
        )
        await repos.save(repo, actor="ana")
    finally:
        await pool.close()
    async with grpc.aio.insecure_channel(stack.imagebuild.address) as ch:
        images = imagebuild_pb2_grpc.ImageBuildServiceStub(ch)

        async def shown() -> ib.Image | None:
            try:
                return await images.GetImage(
                    ib.GetImageRequest(group=group, image=f"{name}:{version}"),
                    metadata=md("ana"),
                )
            except grpc.aio.AioRpcError:
                return None

        image: ib.Image = await wait_for(shown, timeout=20, interval=0.1, message=f"{name}")
    assert image.kind == "oci" and image.image_ref.endswith(f"@sha256:{OCI_DIGEST}")
    return image


def _pending_pod(name: str, deployment: str, revision: int, image: ib.Image) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shipyard-models",
            "labels": {
                "app.kubernetes.io/managed-by": "shipyard",
                "shipyard.dev/deployment": deployment,
                "shipyard.dev/revision": str(revision),
            },
        },
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "model",
                    "image": image.image_ref,
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                }
            ],
        },
    }


def _refusal(image: str) -> str:
    return (
        f"image {image} is a container image built for a cluster (kind oci); the local "
        "runtime runs environment packs: build it with build_backend=local "
        "(SHIPYARD_BUILD_BACKEND), or run the scheduler with runtime_backend=kubernetes "
        "(SHIPYARD_RUNTIME_BACKEND)"
    )


async def test_an_oci_image_is_refused_up_front_on_the_local_backend(stack: Stack) -> None:
    await _record_oci_image(stack, "iris-cluster")
    async with stack.channel() as ch:
        stub = stack.stub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateDeployment(
                pb.CreateDeploymentRequest(
                    name="iris-oci",
                    spec=pb.DeploymentSpec(image="iris-cluster:1", instance_type="cpu.small"),
                ),
                metadata=md("ana"),
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details() == _refusal("iris-cluster:1")
        # Nothing reserved, nothing recorded.
        await _used_instances(stack, 0)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetDeployment(pb.DeploymentRef(name="iris-oci"), metadata=md("ana"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        # An update to it is refused the same way; the deployment keeps its revision.
        await stub.CreateDeployment(
            pb.CreateDeploymentRequest(
                name="echo-to-oci",
                spec=pb.DeploymentSpec(image=stack.images["v1"], instance_type="cpu.small"),
            ),
            metadata=md("ana"),
        )
        with pytest.raises(grpc.aio.AioRpcError) as update:
            await stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(name="echo-to-oci", image="iris-cluster"),
                metadata=md("ana"),
            )
        assert update.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert update.value.details() == _refusal("iris-cluster:1")
        kept = await stub.GetDeployment(pb.DeploymentRef(name="echo-to-oci"), metadata=md("ana"))
        assert kept.revision == 1 and kept.image.name == "echo"
        await stub.DeleteDeployment(pb.DeploymentRef(name="echo-to-oci"), metadata=md("ana"))
        await _used_instances(stack, 0)


async def test_a_kubernetes_scheduler_runs_an_oci_image_itself(
    stack: Stack, postgres_server: PostgresProcess
) -> None:
    """Imagebuild's record of a cluster-built image → the scheduler with the kubernetes
    backend (its own database and NATS; the stack's quota and imagebuild) → the revision's
    spec → the Deployment the real kubernetes client sends, here to
    ``shipyard_testing.fake_kube`` (no cluster: nothing is pulled or run)."""
    image = await _record_oci_image(stack, "iris-kube")
    root = Path(tempfile.mkdtemp(prefix="shipyard-sched-k8s-"))
    nats = start_nats(root / "nats")
    api = FakeKubeAPI(namespace="shipyard-models")
    try:
        with serve(api) as url:
            client = k8s.ApiClient(k8s.Configuration(host=url))
            settings = SchedulerSettings(
                database_url=postgres_server.create_database(f"t_{uuid.uuid4().hex[:20]}"),
                nats_url=nats.url,
                grpc_port=0,
                data_dir=root,
                quota_addr=stack.quota.address,
                imagebuild_addr=stack.imagebuild.address,
                internal_token=INTERNAL,
                runtime_backend="kubernetes",
                reconcile_interval_seconds=0.2,
            )
            scheduler = await build_scheduler(
                settings,
                InternalTokenAuthenticator(StaticAuthenticator(TOKENS), INTERNAL),
                backend=KubernetesBackend(client, namespace="shipyard-models", resync_seconds=0),
            )
            try:
                async with scheduler.host, grpc.aio.insecure_channel(scheduler.host.address) as ch:
                    stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
                    created = await stub.CreateDeployment(
                        pb.CreateDeploymentRequest(
                            name="iris-kube",
                            spec=pb.DeploymentSpec(image="iris-kube:1", instance_type="cpu.small"),
                        ),
                        metadata=md("ana"),
                    )
                    assert created.image.digest == OCI_DIGEST
                    assert created.image.kind == "oci"
                    assert created.image.reference == image.image_ref
                    await _used_instances(stack, 1)
                    # The revision records what it runs.
                    event = (await scheduler.commands.store.read_stream("deployment:iris-kube"))[0]
                    assert event.event_type == "DeploymentCreated" and event.schema_version == 2
                    spec = event.payload["spec"]
                    assert (spec["image_kind"], spec["image_ref"]) == ("oci", image.image_ref)
                    assert spec["pack_key"] == ""

                    name = "sy-iris-kube-r1"
                    await wait_for(
                        lambda: {("deployments", name), ("services", name)} <= set(api.objects),
                        timeout=20,
                        message="the revision's Deployment and Service applied",
                    )
                    # What the client sent: a Deployment the schemas admit, strictly.
                    deployment = next(
                        r.body
                        for r in api.requests
                        if r.method == "PATCH" and r.path.endswith(f"/deployments/{name}")
                    )
                    kubernetes_validate.validate(
                        deployment, kubernetes_validate.latest_version(), strict=True
                    )
                    pod = deployment["spec"]["template"]["spec"]
                    assert "initContainers" not in pod
                    (model,) = pod["containers"]
                    assert model["image"] == image.image_ref
                    assert model["command"][model["command"].index("--workers") + 1] == "2"
                    # Its pod as a kubelet would report it, still pulling the image.
                    api.pods.append(_pending_pod(f"{name}-7d9f-x1", "iris-kube", 1, image))

                    async def observed() -> list[pb.Instance]:
                        got = await stub.ListInstances(
                            pb.ListInstancesRequest(name="iris-kube"), metadata=md("ana")
                        )
                        return list(got.instances)

                    (pending,) = await wait_for(observed, timeout=20, message="the pod observed")
                    assert pending.instance_id == f"{name}-7d9f-x1"
                    assert pending.backend == "kubernetes"
                    assert pending.status == pb.INSTANCE_STATUS_PENDING

                    # Back to a pack: the next revision fetches it with the init container.
                    await stub.UpdateDeployment(
                        pb.UpdateDeploymentRequest(name="iris-kube", image=stack.images["v1"]),
                        metadata=md("ana"),
                    )
                    await wait_for(
                        lambda: ("deployments", "sy-iris-kube-r2") in api.objects,
                        timeout=20,
                        message="revision 2 applied",
                    )
                    pack_pod = api.objects[("deployments", "sy-iris-kube-r2")]["spec"]["template"][
                        "spec"
                    ]
                    assert [c["name"] for c in pack_pod["initContainers"]] == ["fetch-pack"]
                    # Revision 2 never gets a pod (say its ReplicaSet is refused by an
                    # admission policy): the delete must remove its Deployment all the same.
                    await stub.DeleteDeployment(
                        pb.DeploymentRef(name="iris-kube"), metadata=md("ana")
                    )
                    await _used_instances(stack, 0)
                    await wait_for(
                        lambda: not api.objects, timeout=20, message="the revisions removed"
                    )
            finally:
                client.close()
    finally:
        nats.stop()


async def test_the_images_of_every_deployment_are_protected_from_pruning(stack: Stack) -> None:
    image = await build_image(
        stack.imagebuild.address, "protected", {"serve.py": SERVE, "VERSION": "protected"}
    )
    async with grpc.aio.insecure_channel(stack.imagebuild.address) as ch:
        got = await imagebuild_pb2_grpc.ImageBuildServiceStub(ch).GetImage(
            ib.GetImageRequest(image=image), metadata=md("ana")
        )
    queries = stack.scheduler.queries

    async def in_use() -> set[str]:
        return {d.removeprefix("sha256:") for d in await queries.image_digests_in_use()}

    assert got.digest not in await in_use()
    async with stack.channel() as ch:
        stub = stack.stub(ch)
        await stub.CreateDeployment(
            pb.CreateDeploymentRequest(
                name="echo-protect",
                spec=pb.DeploymentSpec(
                    image=image,
                    instance_type="cpu.small",
                    scaling=pb.Scaling(min_replicas=0, max_replicas=1),
                ),
            ),
            metadata=md("ana"),
        )
        # Scaled to zero: no instance uses the image, yet it is in use.
        assert got.digest in await in_use()
        await stub.DeleteDeployment(pb.DeploymentRef(name="echo-protect"), metadata=md("ana"))

        async def released() -> bool:
            return got.digest not in await in_use()

        await wait_for(released, timeout=10, message="the deleted deployment's image released")
