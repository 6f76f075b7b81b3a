"""The access matrix: a member of team-b can neither see nor change anything of team-a
(deployments, their history, instances, readme and client keys; images, their usage,
readmes and builds), over REST (the facade) and over gRPC, against the real keys, quota,
imagebuild and scheduler services. Logs, metrics and async requests join this matrix
with their services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from shipyard.imagebuild.v1 import imagebuild_pb2 as ib
from shipyard.imagebuild.v1 import imagebuild_pb2_grpc
from shipyard.keys.v1 import client_keys_pb2 as ck
from shipyard.keys.v1 import client_keys_pb2_grpc
from shipyard.scheduler.v1 import scheduler_pb2 as sp
from shipyard.scheduler.v1 import scheduler_pb2_grpc
from shipyard_testing import folder_tar, wait_for

from .facade_conftest import SERVE, ControlPlane, RestClient, control_plane

__all__ = ["control_plane"]  # the fixture, imported so pytest finds it here

HIDDEN = {403, 404}


@pytest.fixture(scope="module")
async def team_a(control_plane: ControlPlane) -> AsyncIterator[dict[str, Any]]:
    """Ana's (team-a) image, build, deployment and client key."""
    async with aiohttp.ClientSession() as session:
        rest = control_plane.client(session)
        started = await rest.post(
            "/builds",
            data=folder_tar({"serve.py": SERVE, "VERSION": "a"}),
            params={"name": "secret-model"},
            headers={"Content-Type": "application/gzip"},
        )
        assert started.status == 202, started.body
        build_id = started.body["build_id"]

        async def built() -> dict[str, Any] | None:
            b: dict[str, Any] = (await rest.get(f"/builds/{build_id}")).body
            return b if b["state"] in ("succeeded", "failed") else None

        build = await wait_for(built, timeout=240, interval=0.2, message="build never ended")
        assert build["state"] == "succeeded", build
        created = await rest.post(
            "/deployments",
            json={
                "name": "matrix-a",
                "spec": {"image": build["image"], "instance_type": "cpu.small"},
                "readme": "# Team A only",
            },
        )
        assert created.status == 201, created.body
        key = await rest.post("/deployments/matrix-a/keys", json={"client": "crm"})
        assert key.status == 201, key.body
        yield {"build_id": build_id, "image": build["image"], "deployment": created.body}
        await rest.delete("/deployments/matrix-a")


REST_PROBES = [
    ("GET", "/deployments/matrix-a", None),
    ("PATCH", "/deployments/matrix-a", {"description": "mine now", "message": "x"}),
    ("POST", "/deployments/matrix-a:stop", None),
    ("POST", "/deployments/matrix-a:start", None),
    ("POST", "/deployments/matrix-a:scale", {"min_replicas": 0, "max_replicas": 1}),
    ("GET", "/deployments/matrix-a/history", None),
    ("GET", "/deployments/matrix-a/instances", None),
    ("GET", "/deployments/matrix-a/readme", None),
    ("PUT", "/deployments/matrix-a/readme", {"markdown": "# pwned"}),
    ("GET", "/deployments/matrix-a/keys", None),
    ("POST", "/deployments/matrix-a/keys", {"client": "thief"}),
    ("DELETE", "/deployments/matrix-a/keys/crm", None),
    ("DELETE", "/deployments/matrix-a", None),
    ("GET", "/images/secret-model?group=team-a", None),
    ("GET", "/images/secret-model/1/usage?group=team-a", None),
    ("GET", "/images/secret-model/1/readme?group=team-a", None),
    ("DELETE", "/images/secret-model/1?group=team-a", None),
]


@pytest.mark.parametrize(("method", "path", "body"), REST_PROBES)
async def test_rest_hides_team_a_from_team_b(
    control_plane: ControlPlane,
    team_a: dict[str, Any],
    method: str,
    path: str,
    body: Any,
) -> None:
    async with aiohttp.ClientSession() as session:
        rest: RestClient = control_plane.client(session)
        if "?" in path:
            path, query = path.split("?", 1)
            params = dict(p.split("=", 1) for p in query.split("&"))
        else:
            params = None
        reply = await rest.call(method, path, user="bob", json=body, params=params)
        assert reply.status in HIDDEN, (method, path, reply.status, reply.body)
        assert "team-a" not in str(reply.body) or "not a member" in str(reply.body)
        # And nothing changed for ana.
        mine = await rest.get("/deployments/matrix-a")
        assert mine.status == 200 and mine.body["status"] != "stopped"
        assert mine.body["description"] == ""
        keys = await rest.get("/deployments/matrix-a/keys")
        assert [k["client"] for k in keys.body["keys"]] == ["crm"]
        build = await rest.get(f"/builds/{team_a['build_id']}", user="bob")
        assert build.status in HIDDEN


async def test_lists_show_team_b_nothing_of_team_a(
    control_plane: ControlPlane, team_a: dict[str, Any]
) -> None:
    async with aiohttp.ClientSession() as session:
        rest = control_plane.client(session)
        for path, field in (("/deployments", "deployments"), ("/images", "images")):
            reply = await rest.get(path, user="bob")
            assert reply.status == 200 and reply.body[field] == [], (path, reply.body)
        builds = await rest.get("/builds", user="bob")
        assert builds.status == 200 and builds.body["builds"] == []
        for path in ("/deployments", "/images", "/builds"):
            scoped = await rest.get(path, user="bob", params={"group": "team-a"})
            assert scoped.status in HIDDEN, (path, scoped.body)


async def test_grpc_hides_team_a_from_team_b(
    control_plane: ControlPlane, team_a: dict[str, Any]
) -> None:
    bob = (("authorization", f"Bearer {control_plane.tokens['bob']}"),)
    calls: list[tuple[str, Any]] = []
    async with (
        grpc.aio.insecure_channel(control_plane.scheduler.address) as sch,
        grpc.aio.insecure_channel(control_plane.imagebuild.address) as img,
        grpc.aio.insecure_channel(control_plane.keys.address) as kch,
    ):
        s = scheduler_pb2_grpc.SchedulerServiceStub(sch)
        i = imagebuild_pb2_grpc.ImageBuildServiceStub(img)
        k = client_keys_pb2_grpc.ClientKeyServiceStub(kch)
        ref = sp.DeploymentRef(name="matrix-a")
        calls = [
            ("GetDeployment", s.GetDeployment(ref, metadata=bob)),
            ("StopDeployment", s.StopDeployment(ref, metadata=bob)),
            ("DeleteDeployment", s.DeleteDeployment(ref, metadata=bob)),
            ("GetHistory", s.GetHistory(ref, metadata=bob)),
            (
                "SetReadme",
                s.SetReadme(sp.SetReadmeRequest(name="matrix-a", markdown="x"), metadata=bob),
            ),
            (
                "ListInstances",
                s.ListInstances(sp.ListInstancesRequest(name="matrix-a"), metadata=bob),
            ),
            (
                "UpdateDeployment",
                s.UpdateDeployment(
                    sp.UpdateDeploymentRequest(
                        name="matrix-a", description="x", set_description=True
                    ),
                    metadata=bob,
                ),
            ),
            ("WatchRoutes", _first(s.WatchRoutes(sp.WatchRoutesRequest(), metadata=bob))),
            ("Activate", s.Activate(sp.ActivateRequest(deployment="matrix-a"), metadata=bob)),
            (
                "GetImage",
                i.GetImage(
                    ib.GetImageRequest(group="team-a", image="secret-model:1"), metadata=bob
                ),
            ),
            ("GetBuild", i.GetBuild(ib.GetBuildRequest(build_id=team_a["build_id"]), metadata=bob)),
            (
                "DeleteImage",
                i.DeleteImage(
                    ib.DeleteImageRequest(group="team-a", image="secret-model:1"), metadata=bob
                ),
            ),
            (
                "ListClientKeys",
                k.ListClientKeys(ck.ListClientKeysRequest(deployment="matrix-a"), metadata=bob),
            ),
            (
                "CreateClientKey",
                k.CreateClientKey(
                    ck.CreateClientKeyRequest(deployment="matrix-a", client="thief"), metadata=bob
                ),
            ),
            (
                "RevokeClientKey",
                k.RevokeClientKey(
                    ck.RevokeClientKeyRequest(deployment="matrix-a", client="crm"), metadata=bob
                ),
            ),
            (
                "VerifyClientKey",
                k.VerifyClientKey(
                    ck.VerifyClientKeyRequest(deployment="matrix-a", secret="sk_x"), metadata=bob
                ),
            ),
        ]
        for name, call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.PERMISSION_DENIED,
            ), (name, refused.value.code(), refused.value.details())
            assert "team-a" not in (refused.value.details() or "") or name in (
                "GetImage",
                "DeleteImage",
            ), (name, refused.value.details())


async def _first(stream: Any) -> Any:
    async for item in stream:
        return item
    return None
