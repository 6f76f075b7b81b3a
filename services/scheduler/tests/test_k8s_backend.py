"""The ``kubernetes`` runtime backend, tested as far as a machine without a cluster allows.

- The Deployment and Service of a revision (adapters/k8s_manifests.py) and the RBAC
  manifest are validated against the Kubernetes OpenAPI schemas shipped by
  kubernetes-validate, in strict mode (an unknown or misspelt field fails), for several
  instance types, and their important fields are asserted. The commands the pods run are
  parsed by the real argument parsers of fetchpack and shipyard_runtime.
- KubernetesBackend runs the real kubernetes client against ``FakeKubeAPI``
  (shipyard_testing.fake_kube): an HTTP server on 127.0.0.1 that answers the REST paths
  the backend uses with canned JSON and records every request. It is NOT a Kubernetes API
  server and NOT a cluster: it proves the verbs, paths, query parameters and bodies the
  client sends and how the backend reads pod, event and log answers (pod JSON written
  here after what a kubelet reports); it cannot prove that a cluster admits the objects,
  schedules the pods, or that the pack downloads and serves in them.
- fetchpack (the init container's command) runs for real, in-process and as
  ``python -m``, against a file:// object store holding a small hand-made pack.
- Revisions of OCI images (built on a cluster by imagebuild's Kaniko Job) get the same
  strict validation; their pod runs the image reference itself with no init container,
  and what it runs is checked against the Dockerfile imagebuild builds such images with
  (its USER, WORKDIR, EXPOSE and CMD). No image is pulled or run: there is no registry
  or cluster here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s

from shipyard_core import kube
from shipyard_core.errors import FailedPrecondition, InvalidArgument, Unavailable
from shipyard_core.objectstore import open_store
from shipyard_imagebuild.adapters.kaniko import dockerfile
from shipyard_runtime.__main__ import build_parser as runtime_parser
from shipyard_scheduler import fetchpack
from shipyard_scheduler.adapters import k8s_manifests, kubernetes
from shipyard_scheduler.adapters.backend import InstancePhase, ObservedInstance, RevisionSpec
from shipyard_scheduler.adapters.k8s_manifests import (
    PodSettings,
    deployment_manifest,
    resource_name,
    service_manifest,
)
from shipyard_scheduler.adapters.kubernetes import KubernetesBackend, instance_from_pod
from shipyard_testing.fake_kube import APPLY_PATCH, FakeKubeAPI, now, rbac_attributes, serve

REPO = Path(__file__).resolve().parents[3]
RBAC_YAML = REPO / "infra" / "k8s" / "scheduler-rbac.yaml"
NS = "shipyard-models"
# The oldest Kubernetes the manifests are meant for, and the newest the installed
# kubernetes-validate knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
DIGEST = "ab" * 32
LONG_NAME = "a-very-long-deployment-name-that-uses-all-of-the-sixty-three-ch"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
SERVICES = f"/api/v1/namespaces/{NS}/services"
PODS = f"/api/v1/namespaces/{NS}/pods"
EVENTS = f"/api/v1/namespaces/{NS}/events"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def make_spec(**overrides: Any) -> RevisionSpec:
    values: dict[str, Any] = {
        "deployment": "iris-prod",
        "group": "team-a",
        "revision": 3,
        "replicas": 2,
        "image": "iris:1",
        "image_digest": DIGEST,
        "pack_key": f"packs/sha256/{DIGEST}",
        "workers": 2,
        "instance_type": "cpu.small",
        "cpu": 0.5,
        "memory_gib": 1.0,
        "gpu": 0,
    }
    values.update(overrides)
    return RevisionSpec(**values)


OCI_REF = f"registry.example/shipyard/team-a/iris@sha256:{DIGEST}"


def make_oci_spec(**overrides: Any) -> RevisionSpec:
    """A revision of an OCI image as the reconciler passes it: the reference pinned by the
    image's digest, no pack."""
    values: dict[str, Any] = {"image_kind": "oci", "image_ref": OCI_REF, "pack_key": ""}
    values.update(overrides)
    return make_spec(**values)


INSTANCE_TYPES = {
    "cpu.small": {"instance_type": "cpu.small", "cpu": 0.5, "memory_gib": 1.0, "gpu": 0},
    "cpu.tiny": {"instance_type": "cpu.tiny", "cpu": 0.1, "memory_gib": 0.25, "gpu": 0},
    "cpu.large": {"instance_type": "cpu.large", "cpu": 4, "memory_gib": 16, "gpu": 0},
    "gpu.a100": {"instance_type": "gpu.a100", "cpu": 8, "memory_gib": 64, "gpu": 2},
}
SETTINGS = {
    "defaults": PodSettings(),
    "private-minio": PodSettings(
        namespace="models",
        service_image="registry.example/shipyard:1.2",
        runtime_image="registry.example/python:3.11-slim",
        pull_secret="registry-login",
        s3_endpoint="http://minio.shipyard:9000",
        store_secret="minio-creds",
        grace_seconds=60,
        drain_seconds=10,
    ),
    "no-secrets": PodSettings(store_secret=None, pull_secret=None, drain_seconds=0),
}


def containers(deployment: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (main,) = pod["containers"]
    return init, main


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("settings", list(SETTINGS), ids=list(SETTINGS))
@pytest.mark.parametrize("itype", [*INSTANCE_TYPES, "long-name"])
@pytest.mark.parametrize("kind", ["pack", "oci"])
def test_manifests_validate_strictly(version: str, settings: str, itype: str, kind: str) -> None:
    make = make_spec if kind == "pack" else make_oci_spec
    if itype == "long-name":
        spec = make(deployment=LONG_NAME, revision=123456)
    else:
        spec = make(**INSTANCE_TYPES[itype])
    for manifest in (
        deployment_manifest(spec, SETTINGS[settings]),
        service_manifest(spec, SETTINGS[settings]),
    ):
        kubernetes_validate.validate(manifest, version, strict=True)


def test_strict_validation_catches_a_misspelt_field() -> None:
    # Proves the check above has teeth: strict schemas refuse unknown fields.
    deployment = deployment_manifest(make_spec(), PodSettings())
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_names_are_dns_labels_even_for_long_deployments() -> None:
    assert resource_name("iris-prod", 3) == "sy-iris-prod-r3"
    assert len(LONG_NAME) == 63
    long = resource_name(LONG_NAME, 123456)
    assert len(long) == 63 and DNS_1035.match(long) and long.endswith("-r123456")
    assert long.startswith("sy-a-very-long-deployment-name")
    assert resource_name(LONG_NAME, 123456) == long  # deterministic: remove() finds it
    # Names that share the kept prefix still differ, through the hash.
    other = resource_name(LONG_NAME[:-1] + "x", 123456)
    assert other != long and len(other) == 63
    # A cut that would end on '-' does not leave '--'.
    dashed = resource_name("a" * 40 + "-" + "b" * 22, 1)
    assert "--" not in dashed and DNS_1035.match(dashed)


def test_deployment_fields() -> None:
    spec = make_spec(env={"MODEL_THREADS": "2", "A_FLAG": "x"})
    settings = SETTINGS["private-minio"]
    d = deployment_manifest(spec, settings)
    labels = {
        "app.kubernetes.io/managed-by": "shipyard",
        "shipyard.dev/deployment": "iris-prod",
        "shipyard.dev/revision": "3",
        "shipyard.dev/group": "team-a",
    }
    assert d["apiVersion"] == "apps/v1" and d["kind"] == "Deployment"
    assert d["metadata"]["name"] == "sy-iris-prod-r3"
    assert d["metadata"]["namespace"] == "models"
    assert d["metadata"]["labels"] == labels
    assert d["metadata"]["annotations"]["shipyard.dev/image"] == "iris:1"
    assert d["spec"]["replicas"] == 2
    selector = {k: v for k, v in labels.items() if k != "shipyard.dev/group"}
    assert d["spec"]["selector"] == {"matchLabels": selector}
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    template = d["spec"]["template"]
    assert template["metadata"]["labels"] == labels
    pod = template["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60
    assert pod["imagePullSecrets"] == [{"name": "registry-login"}]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "tolerations" not in pod
    assert pod["volumes"] == [
        {"name": "env", "emptyDir": {"sizeLimit": "4Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
    ]

    init, main = containers(d)
    assert init["name"] == "fetch-pack"
    assert init["image"] == "registry.example/shipyard:1.2"
    assert init["command"] == [
        "python",
        "-m",
        "shipyard_scheduler.fetchpack",
        "--key",
        f"packs/sha256/{DIGEST}",
        "--dest",
        "/env",
        "--sha256",
        DIGEST,
    ]
    assert init["env"] == [
        {"name": "SHIPYARD_OBJECT_STORE", "value": "s3://shipyard"},
        {"name": "SHIPYARD_S3_ENDPOINT", "value": "http://minio.shipyard:9000"},
    ]
    assert init["envFrom"] == [{"secretRef": {"name": "minio-creds", "optional": True}}]
    # The same cpu and memory as the model: the pod's effective request is unchanged.
    assert init["resources"] == main["resources"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/env", "/tmp"}  # noqa: S108

    assert main["name"] == "model"
    assert main["image"] == "registry.example/python:3.11-slim"
    assert main["command"] == [
        "/env/bin/python",
        "-m",
        "shipyard_runtime",
        "serve",
        "--model-dir",
        "/env/model",
        "--host",
        "0.0.0.0",  # noqa: S104 - the pod's server, as the manifest must run it
        "--port",
        "8080",
        "--workers",
        "2",
        "--name",
        "iris-prod",
        "--graceful-timeout",
        "49",  # 60 s grace - 10 s drain delay - 1 s margin
    ]
    assert "envFrom" not in main  # the store credentials stay in the init container
    env = {e["name"]: e["value"] for e in main["env"]}
    home = "/tmp"  # noqa: S108 - the pod's own emptyDir
    assert env == {"A_FLAG": "x", "MODEL_THREADS": "2", "HOME": home, "PYTHONUNBUFFERED": "1"}
    assert main["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert main["resources"] == {
        "requests": {"cpu": "500m", "memory": "1024Mi"},
        "limits": {"cpu": "500m", "memory": "1024Mi"},
    }
    assert main["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert main["startupProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert main["lifecycle"]["preStop"]["exec"]["command"] == [
        "/env/bin/python",
        "-c",
        "import time; time.sleep(10)",
    ]
    for c in (init, main):
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


@pytest.mark.parametrize(
    ("itype", "expected"),
    [
        ("cpu.small", {"cpu": "500m", "memory": "1024Mi"}),
        ("cpu.tiny", {"cpu": "100m", "memory": "256Mi"}),
        ("cpu.large", {"cpu": "4000m", "memory": "16384Mi"}),
        ("gpu.a100", {"cpu": "8000m", "memory": "65536Mi", "nvidia.com/gpu": "2"}),
    ],
)
def test_resources_follow_the_instance_type(itype: str, expected: dict[str, str]) -> None:
    d = deployment_manifest(make_spec(**INSTANCE_TYPES[itype]), PodSettings())
    init, main = containers(d)
    assert main["resources"] == {"requests": expected, "limits": expected}
    assert "nvidia.com/gpu" not in init["resources"]["limits"]  # the GPU is the model's
    tolerations = d["spec"]["template"]["spec"].get("tolerations")
    if "nvidia.com/gpu" in expected:
        assert tolerations == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    else:
        assert tolerations is None


def test_defaults_without_secrets() -> None:
    d = deployment_manifest(make_spec(image_digest=""), SETTINGS["no-secrets"])
    pod = d["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in pod
    init, main = containers(d)
    assert "envFrom" not in init
    assert "--sha256" not in init["command"]
    assert init["image"] == "ghcr.io/shipyard/shipyard:latest"
    assert main["image"] == "python:3.11-slim"
    assert init["env"] == [{"name": "SHIPYARD_OBJECT_STORE", "value": "s3://shipyard"}]


def test_service_fields() -> None:
    s = service_manifest(make_spec(), PodSettings())
    assert s["apiVersion"] == "v1" and s["kind"] == "Service"
    assert s["metadata"]["name"] == "sy-iris-prod-r3"
    assert s["metadata"]["namespace"] == NS
    assert s["spec"]["type"] == "ClusterIP"
    assert s["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    assert (
        s["spec"]["selector"]
        == deployment_manifest(make_spec(), PodSettings())["spec"]["selector"]["matchLabels"]
    )


def test_pod_commands_parse_with_the_real_command_lines(tmp_path: Path) -> None:
    init, main = containers(deployment_manifest(make_spec(), SETTINGS["private-minio"]))
    args = fetchpack.build_parser().parse_args(init["command"][3:])
    assert args.key == f"packs/sha256/{DIGEST}" and args.sha256 == DIGEST
    served = runtime_parser().parse_args(main["command"][3:])
    assert served.command == "serve" and served.workers == 2 and served.port == 8080
    assert served.name == "iris-prod" and served.graceful_timeout == 49.0
    # The preStop hook is valid Python (run here with this interpreter and no delay).
    _, hook = containers(deployment_manifest(make_spec(), SETTINGS["no-secrets"]))
    command = hook["lifecycle"]["preStop"]["exec"]["command"]
    subprocess.run([sys.executable, *command[1:]], check=True, timeout=30)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"deployment": "Iris_Prod"}, "deployment"),
        ({"group": "Team A"}, "group"),
        ({"revision": 0}, "revision"),
        ({"replicas": -1}, "replicas"),
        ({"workers": 0}, "workers"),
        ({"cpu": 0}, "instance_type"),
        ({"pack_key": "/abs/key"}, "pack_key"),
        ({"image_digest": "md5:abc"}, "image_digest"),
        ({"env": {"HOME": "/root"}}, "env"),
        ({"env": {"BAD NAME": "x"}}, "env"),
    ],
)
def test_specs_the_manifests_cannot_carry_are_refused(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        deployment_manifest(make_spec(**overrides), PodSettings())
    assert err.value.field == field


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"namespace": "Models"}, "namespace"),
        ({"runtime_image": "python 3.11"}, "runtime_image"),
        ({"grace_seconds": 5, "drain_seconds": 5}, "grace_seconds"),
        ({"env_size_limit": "4 GB"}, "env_size_limit"),
        ({"pull_secret": "Bad_Secret"}, "pull_secret"),
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        PodSettings(**overrides)
    assert err.value.field == field


def test_digest_with_prefix_is_accepted() -> None:
    init, _ = containers(
        deployment_manifest(make_spec(image_digest=f"sha256:{DIGEST}"), PodSettings())
    )
    assert init["command"][-2:] == ["--sha256", DIGEST]


# --------------------------------------------------------------------------- OCI images


def test_an_oci_revision_runs_its_image_with_no_pack_download() -> None:
    settings = SETTINGS["private-minio"]
    env = {"MODEL_THREADS": "2"}
    oci = deployment_manifest(make_oci_spec(env=env), settings)
    pack = deployment_manifest(make_spec(env=env), settings)
    pod = oci["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    (main,) = pod["containers"]
    _, pack_main = containers(pack)
    # The image is the reference, pinned by digest: every pod runs the same bytes.
    assert main["image"] == OCI_REF and main["image"].endswith(f"@sha256:{DIGEST}")
    assert main["name"] == "model"
    assert main["command"] == [
        "/opt/shipyard/bin/python",
        "-m",
        "shipyard_runtime",
        "serve",
        "--model-dir",
        "/model",
        "--host",
        "0.0.0.0",  # noqa: S104 - the pod's server, as the manifest must run it
        "--port",
        "8080",
        "--workers",
        "2",
        "--name",
        "iris-prod",
        "--graceful-timeout",
        "49",
    ]
    # Nothing of the object store reaches the pod: no secret, no store settings.
    assert "envFrom" not in main
    assert {e["name"] for e in main["env"]} == {"MODEL_THREADS", "HOME", "PYTHONUNBUFFERED"}
    assert main["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}]
    assert main["lifecycle"]["preStop"]["exec"]["command"] == [
        "/opt/shipyard/bin/python",
        "-c",
        "import time; time.sleep(10)",
    ]
    # The same serving contract as a pack's pod: port, probes, resources, security, env.
    for key in (
        "env",
        "ports",
        "resources",
        "startupProbe",
        "readinessProbe",
        "livenessProbe",
        "securityContext",
        "terminationMessagePolicy",
    ):
        assert main[key] == pack_main[key], key
    pack_pod = pack["spec"]["template"]["spec"]
    for key in (
        "automountServiceAccountToken",
        "enableServiceLinks",
        "terminationGracePeriodSeconds",
        "imagePullSecrets",  # also the login to the registry the image was pushed to
    ):
        assert pod[key] == pack_pod[key], key
    # As the image's own user, not the Shipyard image's.
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # The same labels, selector, annotations and Service as any revision.
    assert oci["metadata"] == pack["metadata"]
    assert oci["spec"]["selector"] == pack["spec"]["selector"]
    assert service_manifest(make_oci_spec(), settings) == service_manifest(make_spec(), settings)
    gpu = deployment_manifest(make_oci_spec(**INSTANCE_TYPES["gpu.a100"]), settings)
    assert gpu["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def _instructions(text: str) -> dict[str, str]:
    """The last argument of each Dockerfile instruction (continuations joined)."""
    found: dict[str, str] = {}
    for line in text.replace("\\\n", " ").splitlines():
        if line and not line.startswith(("#", " ")):
            word, _, rest = line.partition(" ")
            found[word] = rest
    return found


@pytest.mark.parametrize("check", [True, False])
def test_the_oci_pod_runs_the_image_as_its_dockerfile_builds_it(check: bool) -> None:
    """The pod spec against the Dockerfile of imagebuild's cluster builds: the image's
    user, model folder, port and server command (the pod's command replaces the CMD, so
    it must run the same server, from the same place, as the same user)."""
    steps = _instructions(dockerfile("3.11", check=check))
    pod = deployment_manifest(make_oci_spec(), PodSettings())["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    uid, gid = (int(x) for x in steps["USER"].split(":"))
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        uid,
        gid,
    )
    assert int(steps["EXPOSE"]) == main["ports"][0]["containerPort"] == k8s_manifests.SERVE_PORT
    cmd = yaml.safe_load(steps["CMD"])  # a JSON array (exec form)
    image_server = runtime_parser().parse_args(cmd[3:])
    pod_server = runtime_parser().parse_args(main["command"][3:])
    assert main["command"][:3] == cmd[:3] == [kube.MODEL_IMAGE_PYTHON, "-m", "shipyard_runtime"]
    assert pod_server.command == image_server.command == "serve"
    assert pod_server.model_dir == image_server.model_dir == Path(steps["WORKDIR"])
    assert steps["WORKDIR"] == kube.MODEL_IMAGE_DIR == "/model"
    assert pod_server.port == image_server.port and pod_server.host == image_server.host
    # What the CMD leaves to defaults, the pod sets from the revision.
    assert pod_server.workers == 2 and pod_server.name == "iris-prod"
    # The preStop hook is valid Python (run with this interpreter, no delay).
    hook = deployment_manifest(make_oci_spec(), SETTINGS["no-secrets"])["spec"]["template"]
    command = hook["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    subprocess.run([sys.executable, *command[1:]], check=True, timeout=30)


def test_oci_pods_set_what_the_restricted_profile_checks() -> None:
    pod = deployment_manifest(make_oci_spec(), PodSettings())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert all(set(v) <= {"name", "emptyDir"} for v in pod["volumes"])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        # A tag can move: only a digest says which image the revision was made with.
        ({"image_ref": "registry.example/shipyard/team-a/iris:b-1"}, "image_ref"),
        ({"image_ref": ""}, "image_ref"),
        ({"image_ref": f"https://registry.example/iris@sha256:{DIGEST}"}, "image_ref"),
        ({"image_ref": f"registry.example/ir is@sha256:{DIGEST}"}, "image_ref"),
        ({"image_ref": f"registry.example/iris@sha256:{'cd' * 32}"}, "image_ref"),
        ({"image_kind": "wasm"}, "image_kind"),
        ({"image_digest": "md5:abc"}, "image_digest"),
    ],
)
def test_oci_specs_the_manifests_cannot_carry_are_refused(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        deployment_manifest(make_oci_spec(**overrides), PodSettings())
    assert err.value.field == field


def test_an_oci_reference_without_a_recorded_digest_is_pinned_by_its_own() -> None:
    (main,) = deployment_manifest(make_oci_spec(image_digest=""), PodSettings())["spec"][
        "template"
    ]["spec"]["containers"]
    assert main["image"] == OCI_REF


def test_module_exports() -> None:
    assert set(k8s_manifests.__all__) <= set(dir(k8s_manifests))
    assert set(kubernetes.__all__) <= set(dir(kubernetes))


# --------------------------------------------------------------------------- RBAC


def _rbac_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RBAC_YAML.read_text()) if d]


def _role_rules() -> list[dict[str, Any]]:
    (role,) = [d for d in _rbac_docs() if d["kind"] == "Role"]
    return list(role["rules"])


def test_rbac_manifests_validate_strictly() -> None:
    docs = _rbac_docs()
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    namespace = by_kind[("Namespace", NS)]
    # The pods the manifests make are meant to pass the "restricted" profile.
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert by_kind[("ServiceAccount", "scheduler")]["metadata"]["namespace"] == "shipyard"
    assert by_kind[("Role", "scheduler-models")]["metadata"]["namespace"] == NS
    binding = by_kind[("RoleBinding", "scheduler-models")]
    assert binding["metadata"]["namespace"] == NS
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "scheduler-models",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "scheduler", "namespace": "shipyard"}
    ]


def test_pods_set_what_the_restricted_profile_checks() -> None:
    # Not an admission check (no cluster): the fields "restricted" looks at, as set.
    pod = deployment_manifest(make_spec(), PodSettings())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in [*pod["initContainers"], *pod["containers"]]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert all(set(v) <= {"name", "emptyDir"} for v in pod["volumes"])


# --------------------------------------------------------------------------- fake API


@dataclass
class Clock:
    t: float = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Fake:
    api: FakeKubeAPI
    backend: KubernetesBackend
    clock: Clock
    client: Any  # the kubernetes ApiClient talking to the fake


@pytest.fixture
def fake() -> Iterator[Fake]:
    api = FakeKubeAPI(namespace=NS)
    clock = Clock()
    with serve(api) as url:
        client = k8s.ApiClient(k8s.Configuration(host=url))
        backend = KubernetesBackend(
            client,
            namespace=NS,
            service_image="registry.example/shipyard:1",
            runtime_image="python:3.11-slim",
            pull_secret="registry-login",
            store_secret="shipyard-object-store",
            object_store="s3://shipyard",
            grace_seconds=30,
            resync_seconds=60,
            clock=clock,
        )
        try:
            yield Fake(api, backend, clock, client)
        finally:
            client.close()


def _meta(name: str, deployment: str = "iris-prod", revision: int = 3) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": NS,
        "uid": name + "-uid",
        "creationTimestamp": "2025-01-01T10:00:00Z",
        "labels": {
            "app.kubernetes.io/managed-by": "shipyard",
            "shipyard.dev/deployment": deployment,
            "shipyard.dev/revision": str(revision),
            "shipyard.dev/group": "team-a",
            "pod-template-hash": "5d9c7f",
        },
    }


def _cs(
    name: str,
    *,
    ready: bool = False,
    restarts: int = 0,
    state: dict[str, Any] | None = None,
    last: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "image": "python:3.11-slim",
        "imageID": "",
        "ready": ready,
        "restartCount": restarts,
        "state": state or {"running": {"startedAt": "2025-01-01T10:00:05Z"}},
        "lastState": last or {},
    }


FETCHED = {"terminated": {"exitCode": 0, "reason": "Completed"}}


def _pod(
    name: str,
    *,
    phase: str,
    ip: str | None = None,
    ready: bool = False,
    init: dict[str, Any] | None = None,
    main: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    deleting: bool = False,
    meta: dict[str, Any] | None = None,
    **status: Any,
) -> dict[str, Any]:
    conds = conditions if conditions is not None else []
    if phase == "Running":
        conds = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ]
    body: dict[str, Any] = {"phase": phase, "conditions": conds, **status}
    if ip:
        body["podIP"] = ip
    if init is not None:
        body["initContainerStatuses"] = [init]
    if main is not None:
        body["containerStatuses"] = [main]
    metadata = meta or _meta(name)
    if deleting:
        metadata["deletionTimestamp"] = now()
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "status": body}


def _event(
    pod: str, reason: str, message: str, stamp: str, kind: str = "Warning"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{pod}.{reason}.{stamp}", "namespace": NS},
        "involvedObject": {"kind": "Pod", "name": pod, "namespace": NS},
        "reason": reason,
        "message": message,
        "type": kind,
        "lastTimestamp": stamp,
    }


# --------------------------------------------------------------------------- apply / remove


async def test_apply_creates_the_deployment_and_service(fake: Fake) -> None:
    api, backend = fake.api, fake.backend
    spec = make_spec()
    await backend.apply(spec)
    name = "sy-iris-prod-r3"
    assert api.calls() == [("PATCH", f"{DEPLOYMENTS}/{name}"), ("PATCH", f"{SERVICES}/{name}")]
    for r in api.requests:
        # Server-side apply: one request creates or updates, owned by the scheduler.
        assert r.content_type == APPLY_PATCH
        assert r.query["fieldManager"] == ["shipyard-scheduler"]
        assert r.query["force"] == ["true"]
    deployment, service = (r.body for r in api.requests)
    assert deployment == deployment_manifest(spec, backend.settings)
    assert service == service_manifest(spec, backend.settings)
    # What the fake stored is what the backend's settings say.
    pod = api.objects[("deployments", name)]["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "registry-login"}]
    assert pod["initContainers"][0]["image"] == "registry.example/shipyard:1"
    assert set(api.objects) == {("deployments", name), ("services", name)}


async def test_apply_sends_an_oci_revision_as_its_image(fake: Fake) -> None:
    api, backend = fake.api, fake.backend
    spec = make_oci_spec()
    await backend.apply(spec)
    deployment, service = (r.body for r in api.requests)
    assert deployment == deployment_manifest(spec, backend.settings)
    assert service == service_manifest(spec, backend.settings)
    pod = api.objects[("deployments", "sy-iris-prod-r3")]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert [c["image"] for c in pod["containers"]] == [OCI_REF]
    assert pod["imagePullSecrets"] == [{"name": "registry-login"}]
    kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_an_oci_pod_that_cannot_pull_its_image_is_pending_with_why() -> None:
    pulling = _pod(
        "sy-iris-prod-r3-abc",
        phase="Pending",
        main=_cs(
            "model",
            state={
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{OCI_REF}"',
                }
            },
        ),
    )
    instance = instance_from_pod(pulling)
    assert instance is not None and instance.phase is InstancePhase.PENDING
    assert instance.message == f'ImagePullBackOff: Back-off pulling image "{OCI_REF}"'
    running = _pod(
        "sy-iris-prod-r3-abc", phase="Running", ip="10.1.2.3", ready=True, main=_cs("model")
    )
    ready = instance_from_pod(running)
    assert ready is not None and ready.phase is InstancePhase.READY
    assert ready.address == "10.1.2.3:8080"


async def test_apply_again_patches_instead_of_duplicating(fake: Fake) -> None:
    api, backend = fake.api, fake.backend
    spec = make_spec()
    await backend.apply(spec)
    api.requests.clear()

    await backend.apply(spec)  # the same manifests, within resync_seconds: nothing to send
    assert api.requests == []

    fake.clock.t += 60  # resync: sent again, the same objects updated in place
    await backend.apply(spec)
    assert [m for m, _ in api.calls()] == ["PATCH", "PATCH"]
    assert len(api.objects) == 2
    assert api.objects[("deployments", "sy-iris-prod-r3")]["metadata"]["resourceVersion"] == "2"

    api.requests.clear()
    await backend.apply(dataclasses.replace(spec, replicas=5))  # a change: sent at once
    assert [m for m, _ in api.calls()] == ["PATCH", "PATCH"]
    assert api.requests[0].body["spec"]["replicas"] == 5
    assert api.objects[("deployments", "sy-iris-prod-r3")]["spec"]["replicas"] == 5
    assert len(api.objects) == 2

    await backend.apply(make_spec(revision=4))  # another revision: its own objects
    assert len(api.objects) == 4


async def test_a_failed_apply_is_sent_again_next_time(fake: Fake) -> None:
    api, backend = fake.api, fake.backend
    api.fail[("PATCH", "services")] = 503
    with pytest.raises(Unavailable, match="injected 503"):
        await backend.apply(make_spec())
    del api.fail[("PATCH", "services")]
    api.requests.clear()
    await backend.apply(make_spec())
    assert [p for _, p in api.calls()] == [
        f"{DEPLOYMENTS}/sy-iris-prod-r3",
        f"{SERVICES}/sy-iris-prod-r3",
    ]


async def test_apply_refusals_name_the_rbac_file(fake: Fake) -> None:
    fake.api.fail[("PATCH", "deployments")] = 403
    with pytest.raises(FailedPrecondition, match=r"scheduler-rbac\.yaml"):
        await fake.backend.apply(make_spec())
    fake.api.fail[("PATCH", "deployments")] = 422
    with pytest.raises(FailedPrecondition, match="rejected applying Deployment"):
        await fake.backend.apply(make_spec())


async def test_remove_deletes_both_and_is_idempotent(fake: Fake) -> None:
    api, backend = fake.api, fake.backend
    await backend.apply(make_spec())
    await backend.apply(make_spec(revision=4))
    api.requests.clear()
    await backend.remove("iris-prod", 3)
    assert api.calls() == [
        ("DELETE", f"{DEPLOYMENTS}/sy-iris-prod-r3"),
        ("DELETE", f"{SERVICES}/sy-iris-prod-r3"),
    ]
    assert all(r.query["propagationPolicy"] == ["Background"] for r in api.requests)
    assert set(api.objects) == {("deployments", "sy-iris-prod-r4"), ("services", "sy-iris-prod-r4")}
    await backend.remove("iris-prod", 3)  # both 404 now: nothing to do
    await backend.remove("never-deployed", 1)
    # Removed revisions are forgotten: applying one again sends it at once.
    api.requests.clear()
    await backend.apply(make_spec())
    assert len(api.requests) == 2 and len(api.objects) == 4


async def test_open_checks_access_and_close_keeps_a_given_client(fake: Fake) -> None:
    await fake.backend.open()
    (listing,) = fake.api.requests
    assert (listing.method, listing.path) == ("GET", PODS)
    assert listing.query["labelSelector"] == ["app.kubernetes.io/managed-by=shipyard"]
    assert listing.query["limit"] == ["1"]
    fake.api.fail[("GET", "pods")] = 403
    with pytest.raises(FailedPrecondition, match=r"scheduler-rbac\.yaml"):
        await fake.backend.open()
    await fake.backend.close()
    del fake.api.fail[("GET", "pods")]
    await fake.backend.open()  # the caller's client still works after close()


async def test_without_a_client_one_is_built_from_the_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Outside a cluster (no KUBERNETES_SERVICE_HOST) the kubeconfig is used.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api = FakeKubeAPI(namespace=NS)
    with serve(api) as url:
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": url}}],
            "users": [{"name": "me", "user": {"token": "t0ken"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
            "current-context": "fake",
        }
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(path))
        backend = KubernetesBackend(namespace=NS)
        await backend.open()
        await backend.close()  # closes the client it built
    assert api.calls() == [("GET", PODS)]
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(FailedPrecondition, match="no Kubernetes configuration"):
        KubernetesBackend(namespace=NS)


# --------------------------------------------------------------------------- observe


def _pods_in_every_state() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    crashed = {
        "terminated": {
            "exitCode": 137,
            "reason": "OOMKilled",
            "message": "loading model.joblib\nKilled",
            "startedAt": "2025-01-01T10:00:05Z",
            "finishedAt": "2025-01-01T10:00:09Z",
        }
    }
    backoff = {
        "waiting": {
            "reason": "CrashLoopBackOff",
            "message": "back-off 40s restarting failed container=model pod=crash",
        }
    }
    fetch_failed = {
        "terminated": {
            "exitCode": 1,
            "reason": "Error",
            "message": "error: object 'packs/sha256/ab' not found in the object store s3://shipyard",
        }
    }
    waiting_for_init = _cs("model", state={"waiting": {"reason": "PodInitializing"}})
    pods = [
        _pod(
            "unschedulable",
            phase="Pending",
            conditions=[
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ],
        ),
        _pod(
            "fetching",
            phase="Pending",
            ip="10.0.0.4",
            init=_cs("fetch-pack"),
            main=waiting_for_init,
            conditions=[{"type": "PodScheduled", "status": "True"}],
        ),
        _pod(
            "pull-backoff",
            phase="Pending",
            init=_cs(
                "fetch-pack",
                state={
                    "waiting": {
                        "reason": "ImagePullBackOff",
                        "message": 'Back-off pulling image "registry.example/shipyard:1"',
                    }
                },
            ),
            main=waiting_for_init,
        ),
        _pod(
            "fetch-crash",
            phase="Pending",
            ip="10.0.0.5",
            init=_cs("fetch-pack", restarts=2, state=backoff, last=fetch_failed),
            main=waiting_for_init,
        ),
        _pod(
            "starting",
            phase="Running",
            ip="10.0.0.6",
            init=_cs("fetch-pack", state=FETCHED),
            main=_cs("model"),
        ),
        _pod(
            "ready",
            phase="Running",
            ip="10.0.0.7",
            ready=True,
            init=_cs("fetch-pack", state=FETCHED),
            main=_cs("model", ready=True, restarts=1),
        ),
        _pod(
            "crash",
            phase="Running",
            ip="10.0.0.8",
            init=_cs("fetch-pack", state=FETCHED),
            main=_cs("model", restarts=4, state=backoff, last=crashed),
        ),
        _pod(
            "restarted",
            phase="Running",
            ip="10.0.0.9",
            init=_cs("fetch-pack", state=FETCHED),
            main=_cs("model", restarts=1, last=crashed),
        ),
        _pod(
            "deleting",
            phase="Running",
            ip="10.0.0.10",
            ready=True,
            init=_cs("fetch-pack", state=FETCHED),
            main=_cs("model", ready=True),
            deleting=True,
        ),
        _pod(
            "evicted",
            phase="Failed",
            reason="Evicted",
            message="The node was low on resource: memory.",
            meta=_meta("evicted", revision=2),
        ),
        _pod(
            "other-model",
            phase="Running",
            ip="10.0.1.1",
            ready=True,
            meta=_meta("other-model", "fraud", 1),
        ),
    ]
    # Not Shipyard's: the label selector keeps it out.
    foreign = _pod("foreign", phase="Running", ip="10.9.9.9", ready=True)
    foreign["metadata"]["labels"] = {"app": "something-else"}
    pods.append(foreign)
    events = [
        _event(
            "unschedulable",
            "FailedScheduling",
            "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            "2025-01-01T10:00:01Z",
        ),
        _event("fetching", "Pulled", "Successfully pulled image", "2025-01-01T10:00:02Z", "Normal"),
        _event(
            "starting",
            "Unhealthy",
            "Readiness probe failed: connection refused",
            "2025-01-01T10:00:07Z",
        ),
        _event(
            "starting",
            "Unhealthy",
            "Startup probe failed: connection refused",
            "2025-01-01T10:00:03Z",
        ),
        _event(
            "pull-backoff",
            "Failed",
            'Failed to pull image "registry.example/shipyard:1": not found',
            "2025-01-01T10:00:02Z",
        ),
        _event("ready", "Unhealthy", "Readiness probe failed: timeout", "2025-01-01T10:00:03Z"),
    ]
    return pods, events


async def test_observe_maps_pods_in_every_state(fake: Fake) -> None:
    api, backend = fake.api, fake.backend
    api.pods, api.events = _pods_in_every_state()
    seen = {i.instance_id: i for i in await backend.observe()}
    assert set(seen) == {
        "unschedulable",
        "fetching",
        "pull-backoff",
        "fetch-crash",
        "starting",
        "ready",
        "crash",
        "restarted",
        "deleting",
        "evicted",
        "other-model",
    }

    def check(name: str, phase: InstancePhase, address: str = "", restarts: int = 0) -> str:
        i = seen[name]
        assert (i.phase, i.address, i.restarts) == (phase, address, restarts), i
        return i.message

    # Pending, unschedulable: the pod's condition; the same FailedScheduling event adds nothing.
    msg = check("unschedulable", InstancePhase.PENDING)
    assert msg == "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    assert check("fetching", InstancePhase.PENDING, "10.0.0.4:8080") == ""  # Normal events only
    msg = check("pull-backoff", InstancePhase.PENDING)
    assert msg.startswith('ImagePullBackOff: Back-off pulling image "registry.example/shipyard:1"')
    assert msg.endswith('(Failed: Failed to pull image "registry.example/shipyard:1": not found)')
    # The pack download crash-loops: the fetchpack error from the termination message.
    msg = check("fetch-crash", InstancePhase.FAILED, "10.0.0.5:8080", restarts=2)
    assert msg.startswith("fetching the environment pack failed: exited with code 1 (Error): ")
    assert "not found in the object store s3://shipyard" in msg
    assert "CrashLoopBackOff: back-off 40s" in msg
    # Running, not ready: STARTING, with the newest warning event.
    msg = check("starting", InstancePhase.STARTING, "10.0.0.6:8080")
    assert msg == "Unhealthy: Readiness probe failed: connection refused"
    assert check("ready", InstancePhase.READY, "10.0.0.7:8080", restarts=1) == ""
    # Crash loop: the last exit (reason, code, its last log lines) and the backoff.
    msg = check("crash", InstancePhase.FAILED, "10.0.0.8:8080", restarts=4)
    assert msg.startswith(
        "exited with code 137 (OOMKilled): loading model.joblib\nKilled; CrashLoopBackOff:"
    )
    msg = check("restarted", InstancePhase.STARTING, "10.0.0.9:8080", restarts=1)
    assert msg.startswith("restarted after it exited with code 137 (OOMKilled)")
    assert check("deleting", InstancePhase.TERMINATED, "10.0.0.10:8080") == "terminating"
    evicted = seen["evicted"]
    assert (evicted.phase, evicted.revision) == (InstancePhase.FAILED, 2)
    assert evicted.message == "Evicted: The node was low on resource: memory."
    other = seen["other-model"]
    assert (other.deployment, other.revision, other.phase) == ("fraud", 1, InstancePhase.READY)

    listing = api.requests[0]
    assert (listing.method, listing.path) == ("GET", PODS)
    assert listing.query["labelSelector"] == ["app.kubernetes.io/managed-by=shipyard"]
    lookups = [r for r in api.requests if r.path == EVENTS]
    looked_up = {r.query["fieldSelector"][0] for r in lookups}
    # Events are read for pods that are not ready, and only for them.
    not_ready = {"unschedulable", "fetching", "pull-backoff", "fetch-crash", "starting"}
    not_ready |= {"crash", "restarted", "evicted"}
    assert looked_up == {f"involvedObject.kind=Pod,involvedObject.name={n}" for n in not_ready}
    assert len(api.requests) == 1 + len(not_ready)


async def test_observe_is_sorted_and_bounds_event_lookups(fake: Fake) -> None:
    api = fake.api
    backend = KubernetesBackend(
        fake.client,  # the fixture's client, with a smaller lookup budget
        namespace=NS,
        max_event_lookups=2,
    )
    api.pods = [_pod(f"p{i}", phase="Pending") for i in (3, 1, 2, 4)]
    instances = await backend.observe()
    assert [i.instance_id for i in instances] == ["p1", "p2", "p3", "p4"]
    assert sum(r.path == EVENTS for r in api.requests) == 2


async def test_observe_without_events_still_answers(fake: Fake) -> None:
    api = fake.api
    api.pods = [_pod("p", phase="Pending")]
    api.fail[("GET", "events")] = 403  # events are detail: their loss is not an error
    (instance,) = await fake.backend.observe()
    assert instance.phase is InstancePhase.PENDING
    api.fail[("GET", "pods")] = 500
    with pytest.raises(Unavailable):
        await fake.backend.observe()


def test_pods_without_shipyard_labels_are_not_instances() -> None:
    pod = _pod("p", phase="Running")
    del pod["metadata"]["labels"]["shipyard.dev/revision"]
    assert instance_from_pod(pod) is None
    pod["metadata"]["labels"]["shipyard.dev/revision"] = "not-a-number"
    assert instance_from_pod(pod) is None
    # A pod the API reports with no status yet is pending.
    bare = {"metadata": _meta("fresh")}
    assert instance_from_pod(bare) == ObservedInstance(
        "fresh", "iris-prod", 3, InstancePhase.PENDING
    )


def test_long_messages_are_clipped() -> None:
    huge = {"terminated": {"exitCode": 1, "reason": "Error", "message": "x" * 10_000}}
    pod = _pod("p", phase="Running", main=_cs("model", state=huge))
    instance = instance_from_pod(pod)
    assert instance is not None and instance.phase is InstancePhase.FAILED
    assert len(instance.message) == 2000 and instance.message.endswith("...")


# --------------------------------------------------------------------------- logs


async def test_logs_tail_reads_the_model_container(fake: Fake) -> None:
    api, backend = fake.api, fake.backend
    api.pods = [_pod("p", phase="Running")]
    # A log that is one JSON document comes back as written, not parsed and re-printed.
    api.logs = {"p/model": '{"ok": false}', "p/fetch-pack": "unpacked\n"}
    assert await backend.logs_tail("p", lines=20) == '{"ok": false}'
    (read,) = api.requests
    assert (read.method, read.path) == ("GET", f"{PODS}/p/log")
    assert read.query["container"] == ["model"] and read.query["tailLines"] == ["20"]


async def test_logs_tail_falls_back_to_the_pack_download(fake: Fake) -> None:
    api, backend = fake.api, fake.backend
    api.pods = [_pod("p", phase="Pending")]
    api.logs = {"p/fetch-pack": "error: object not found \u2717\n"}
    # The model container has not started (400): the init container's log instead.
    assert await backend.logs_tail("p") == "error: object not found \u2717\n"
    assert [r.query["container"] for r in api.requests] == [["model"], ["fetch-pack"]]
    assert api.requests[0].query["tailLines"] == ["50"]
    api.logs = {}
    assert await backend.logs_tail("p") == ""  # neither has started
    assert await backend.logs_tail("gone") == ""  # 404


async def test_every_call_the_backend_makes_is_allowed_by_the_role(fake: Fake) -> None:
    api, backend = fake.api, fake.backend
    await backend.open()
    await backend.apply(make_spec())
    api.pods, api.events = _pods_in_every_state()
    api.logs = {"ready/model": "ok\n"}
    await backend.observe()
    # The applied revision counts even though none of the pods above belongs to it.
    assert await backend.revisions() == {("iris-prod", 3)}
    await backend.logs_tail("ready")
    await backend.logs_tail("fetching")
    await backend.remove("iris-prod", 3)
    assert await backend.revisions() == set()
    rules = _role_rules()
    seen = set()
    for r in api.requests:
        ns, group, resource, verb = rbac_attributes(r.method, r.path)
        assert ns == NS
        allowed = [
            rule for rule in rules if group in rule["apiGroups"] and resource in rule["resources"]
        ]
        assert any(verb in rule["verbs"] for rule in allowed), (r.method, r.path)
        if r.content_type == APPLY_PATCH:
            # An apply that creates the object is also authorized as "create".
            assert any("create" in rule["verbs"] for rule in allowed), r.path
        seen.add((group, resource, verb))
    expected = {
        ("apps", "deployments", "list"),
        ("apps", "deployments", "patch"),
        ("", "services", "patch"),
        ("apps", "deployments", "delete"),
        ("", "services", "delete"),
        ("", "pods", "list"),
        ("", "events", "list"),
        ("", "pods/log", "get"),
    }
    assert seen == expected


# --------------------------------------------------------------------------- fetchpack


def _tar_gz(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, text: str, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def small_pack() -> bytes:
    """The shape of an environment pack: pyvenv.cfg, bin/python linking to this host's
    interpreter by absolute path (as a real pack links to its build host's), a model."""
    home = os.path.dirname(os.path.realpath(sys.executable))
    version = ".".join(map(str, sys.version_info[:3]))
    return _tar_gz(
        [
            _dir("bin"),
            _link("bin/python", os.path.realpath(sys.executable)),
            _link("bin/python3", "python"),
            _dir("model"),
            _file(
                "model/serve.py",
                "def load(d):\n    return 1\n\n\ndef predict(m, p):\n    return p\n",
            ),
            _file(
                "pyvenv.cfg",
                f"home = {home}\ninclude-system-site-packages = false\nversion_info = {version}\n",
            ),
        ]
    )


@dataclass
class Store:
    url: str
    key: str
    sha256: str


@pytest.fixture
async def store(tmp_path: Path) -> Store:
    url = (tmp_path / "store").as_uri()
    pack = tmp_path / "pack.tar.gz"
    pack.write_bytes(small_pack())
    objects = open_store(url)
    digest, key, _ = await objects.put_content_addressed(pack, "packs")
    await objects.put_bytes("packs/not-a-pack.tar.gz", _tar_gz([_file("README", "hi\n")]))
    return Store(url, key, digest)


def _main(*argv: str) -> int:
    # fetchpack.main() runs its own event loop; in a worker thread it may, whatever the
    # test's loop is doing.
    return fetchpack.main(list(argv))


async def test_fetchpack_runs_as_the_init_container_would(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "env"
    command = [sys.executable, "-m", "shipyard_scheduler.fetchpack"]
    command += ["--key", store.key, "--dest", str(dest), "--sha256", store.sha256]
    env = {**os.environ, "SHIPYARD_OBJECT_STORE": store.url}
    done = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{store.key} unpacked into {dest}"
    assert (dest / "model" / "serve.py").is_file()
    # The unpacked environment's Python runs, and knows it is a venv rooted at dest.
    prefix = await asyncio.to_thread(
        subprocess.run,
        [str(dest / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert Path(prefix.stdout.strip()) == dest
    assert (dest / fetchpack.MARKER).read_text() == store.key

    # Run again (a recreated pod sandbox): nothing is downloaded, even with the pack gone.
    await open_store(store.url).delete(store.key)
    again = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert "already unpacked" in again.stdout


async def test_fetchpack_bad_input_exits_2_with_one_line(store: Store, tmp_path: Path) -> None:
    dest = str(tmp_path / "env")
    command = [sys.executable, "-m", "shipyard_scheduler.fetchpack", "--key", "/etc/passwd"]
    env = {**os.environ, "SHIPYARD_OBJECT_STORE": store.url}
    bad = await asyncio.to_thread(
        subprocess.run, [*command, "--dest", dest], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: key: '/etc/passwd'")
    assert not await asyncio.to_thread(Path(dest).exists)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--store", ""], "error: no object store: pass --store or set SHIPYARD_OBJECT_STORE"),
        (["--store", "ftp://x"], "error: SHIPYARD_OBJECT_STORE: 'ftp://x' is not a supported"),
        (["--key", "a/../b"], "error: key: 'a/../b' has an empty, '.' or '..' segment"),
        (["--sha256", "abc"], "error: --sha256 'abc' is not a sha256 hex digest"),
    ],
    ids=["no-store", "bad-store", "bad-key", "bad-digest"],
)
async def test_fetchpack_refuses_bad_arguments(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    error: str,
) -> None:
    monkeypatch.delenv("SHIPYARD_OBJECT_STORE", raising=False)
    given = {"--store": store.url, "--key": store.key, "--dest": str(tmp_path / "env")}
    given.update(zip(args[::2], args[1::2], strict=True))
    argv = [x for pair in given.items() if pair[1] for x in pair]
    assert await asyncio.to_thread(_main, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(error) and err.count("\n") == 1


async def test_fetchpack_refuses_a_folder_that_is_not_its_own(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "env"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    base = ["--store", store.url, "--key", store.key, "--dest", str(dest)]
    assert await asyncio.to_thread(_main, *base) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (dest / "precious.txt").read_text() == "keep me"
    (dest / "precious.txt").unlink()
    (dest / fetchpack.MARKER).write_text("packs/sha256/other")
    assert await asyncio.to_thread(_main, *base) == 2
    assert "holds another pack (packs/sha256/other)" in capsys.readouterr().err
    afile = tmp_path / "a-file"
    afile.write_text("")
    assert await asyncio.to_thread(_main, *base[:-1], str(afile)) == 2
    assert "is not a folder" in capsys.readouterr().err


async def test_fetchpack_redoes_an_interrupted_unpack(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "env"
    (dest / "bin").mkdir(parents=True)
    (dest / "bin" / "half-written").write_text("")
    (dest / "stray").symlink_to("/nonexistent")
    (dest / (fetchpack.MARKER + ".partial")).write_text(store.key)
    assert (
        await asyncio.to_thread(
            _main, "--store", store.url, "--key", store.key, "--dest", str(dest)
        )
        == 0
    )
    assert not (dest / "bin" / "half-written").exists() and not (dest / "stray").is_symlink()
    assert (dest / "pyvenv.cfg").is_file() and (dest / fetchpack.MARKER).is_file()
    assert not (dest / (fetchpack.MARKER + ".partial")).exists()


@pytest.mark.parametrize(
    ("key", "sha256", "error"),
    [
        ("packs/missing.tar.gz", None, "not found"),
        (None, "0" * 64, "expected " + "0" * 64),
        ("packs/not-a-pack.tar.gz", None, "is not an environment pack (no pyvenv.cfg)"),
    ],
    ids=["missing", "digest-mismatch", "not-a-pack"],
)
async def test_fetchpack_failures_exit_1(
    store: Store,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    key: str | None,
    sha256: str | None,
    error: str,
) -> None:
    argv = ["--store", store.url, "--key", key or store.key, "--dest", str(tmp_path / "env")]
    if sha256:
        argv += ["--sha256", sha256]
    assert await asyncio.to_thread(_main, *argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and error in err and err.count("\n") == 1
    # The pack was never committed: a rerun starts over instead of skipping.
    assert not (tmp_path / "env" / fetchpack.MARKER).exists()
