"""infra/ stays in step with the code: stream definitions, manifests, compose file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from shipyard.client.config import DEFAULT_PORTS
from shipyard_core.bus import stream_configs

ROOT = Path(__file__).resolve().parent.parent


def test_jetstream_definitions_match_the_code() -> None:
    checked_in = json.loads((ROOT / "infra/jetstream/streams.json").read_text())
    assert checked_in == [json.loads(json.dumps(c.as_dict())) for c in stream_configs()], (
        "infra/jetstream/streams.json drifted from shipyard_core.bus.stream_configs()"
    )


def _docs(path: Path) -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_k8s_manifests_cover_every_service_with_probes_and_ports() -> None:
    kustomization = yaml.safe_load((ROOT / "infra/k8s/kustomization.yaml").read_text())
    for service in ("keys", "quota", "imagebuild", "scheduler", "logging", "gateway"):
        assert f"{service}.yaml" in kustomization["resources"]
        deployment, svc = _docs(ROOT / f"infra/k8s/{service}.yaml")
        assert deployment["kind"] == "Deployment" and svc["kind"] == "Service"
        container = deployment["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index]
        port = DEFAULT_PORTS[service]
        assert container["ports"][0]["containerPort"] == port
        probe = container["readinessProbe"]
        if service == "gateway":  # ready once it has the routing table
            assert probe["httpGet"]["path"] == "/v2/health/ready"
        else:
            assert probe["grpc"]["port"] == port
        assert container["command"] == ["python", "-m", f"shipyard_{service}"]
        env = {e["name"]: e for e in container["env"]}
        assert env["SHIPYARD_GRPC_PORT"]["value"] == str(port)
        assert svc["spec"]["ports"][0]["port"] == port  # type: ignore[index]


def test_compose_runs_every_service_on_its_port() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in ("keys", "quota", "imagebuild", "scheduler", "logging", "gateway"):
        spec = compose["services"][service]
        assert spec["command"] == ["python", "-m", f"shipyard_{service}"]
        assert spec["environment"]["SHIPYARD_GRPC_PORT"] == str(DEFAULT_PORTS[service])
    assert {"nats", "postgres", "minio"} <= set(compose["services"])
