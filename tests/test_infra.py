"""infra/ stays in step with the code: stream definitions, manifests, compose file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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


# --- the Grafana dashboard ------------------------------------------------------------------

_PROMQL_FUNCTIONS = frozenset(
    {"sum", "rate", "irate", "increase", "histogram_quantile", "max", "min", "avg", "count"}
)
_PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "group_left", "group_right"})
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_IDENTIFIER = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")


def _promql_references(expr: str) -> tuple[set[str], set[str], list[tuple[str, str, str]]]:
    """``(metric names, grouping label names, label matchers)`` of a PromQL expression;
    fails on a function it does not know (so the check cannot be fooled silently)."""
    matchers: list[tuple[str, str, str]] = []
    for body in _MATCHERS.findall(expr):
        for part in filter(None, re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', body)):
            m = _MATCHER.fullmatch(part)
            assert m, f"cannot read label matcher {part!r} in {expr!r}"
            matchers.append((m.group(1), m.group(2), m.group(3)))
    grouping = {
        label.strip() for _, labels in _GROUPING.findall(expr) for label in labels.split(",")
    } - {""}
    bare = _GROUPING.sub(" ", _MATCHERS.sub(" ", re.sub(r"\[[^\]]*\]", " ", expr)))
    names: set[str] = set()
    for m in _IDENTIFIER.finditer(bare):
        token = m.group()
        if bare[m.end() :].lstrip().startswith("("):
            assert token in _PROMQL_FUNCTIONS, f"unknown PromQL function {token} in {expr!r}"
        elif token not in _PROMQL_KEYWORDS:
            names.add(token)
    return names, grouping, matchers


def _panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in items:
        out.append(item)
        out.extend(_panels(item.get("panels", [])))
    return out


def test_grafana_dashboard_queries_only_what_the_gateway_exposes() -> None:
    from shipyard_gateway.prometheus import (
        DURATION,
        IN_FLIGHT,
        LABEL_NAMES,
        REQUESTS,
        SAMPLE_NAMES,
        STATUS_CLASSES,
    )

    dashboard = json.loads((ROOT / "infra/grafana/shipyard-gateway.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    query = variables["deployment"]["query"]["query"]
    m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", query)
    assert m and m.group(1) in SAMPLE_NAMES and m.group(2) in LABEL_NAMES

    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in _panels(dashboard["panels"])}) == len(_panels(dashboard["panels"]))
    used: set[str] = set()
    quantiles: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names, grouping, matchers = _promql_references(expr)
            assert names, f"{panel['title']}: {expr!r} references no metric"
            assert names <= SAMPLE_NAMES, f"{panel['title']}: {names - SAMPLE_NAMES} not exposed"
            assert grouping <= LABEL_NAMES, f"{panel['title']}: {grouping - LABEL_NAMES}"
            for label, op, value in matchers:
                assert label in LABEL_NAMES, f"{panel['title']}: label {label}"
                if label == "status_class":
                    values = value.split("|") if op.endswith("~") else [value]
                    assert set(values) <= set(STATUS_CLASSES), f"{panel['title']}: {value}"
            used |= names
            quantiles.update(re.findall(r"histogram_quantile\(([\d.]+),.*?\brate\((\w+)", expr))
    # The panels the issue asks for: QPS, success rate, 4xx, 5xx, latency percentiles,
    # and in flight.
    titles = {p["title"] for p in panels}
    assert {
        "Request rate by deployment",
        "Error rate by class",
        "In flight by deployment",
    } <= titles
    assert {"QPS", "Success rate", "4xx rate", "5xx rate"} <= titles
    assert {REQUESTS, f"{DURATION}_bucket", IN_FLIGHT} <= used
    assert {q for q, metric in quantiles if metric == f"{DURATION}_bucket"} >= {
        "0.5",
        "0.95",
        "0.99",
    }


def test_promql_reference_extraction() -> None:
    names, grouping, matchers = _promql_references(
        'histogram_quantile(0.9, sum by (deployment, le) (rate(a_bucket{deployment=~"x|y",'
        'k="a,b"}[$__rate_interval]))) / ignoring(le) group_left sum(b_total offset 1m)'
    )
    assert names == {"a_bucket", "b_total"}
    assert grouping == {"deployment", "le"}
    assert matchers == [("deployment", "=~", "x|y"), ("k", "=", "a,b")]
