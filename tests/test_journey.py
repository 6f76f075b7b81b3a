"""A new user's first session, end to end: `shipyard up` with the real services, the CLI
binary as a person types it, groups confined to themselves, and data kept across
`down` / `up`. Everything real: NATS, PostgreSQL, service processes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from shipyard_platform import down, up
from shipyard_testing import wait_for_sync

from .conftest import SHIPYARD, admin_token, sy, two_teams


def _alive(pid: int) -> bool:
    # A zombie (exited, not yet reaped by whoever adopted it) is not alive.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sy_lines(home: Path, *args: str, token: str) -> list[str]:
    """Runs a CLI command that prints text lines (not --json); returns them."""
    env = {k: v for k, v in os.environ.items() if k != "SHIPYARD_TOKEN"}
    proc = subprocess.run(
        [SHIPYARD, "--home", str(home), "--token", token, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc.stdout.splitlines()


def test_first_session(home: Path) -> None:
    statuses = sy(home, "status")
    assert statuses and all(s["healthy"] for s in statuses), statuses
    assert sy(home, "users", "whoami")["admin"] is True

    # An admin sets up the catalog, two teams, their members and quotas.
    ana, bob = two_teams(home, ("team-a", "team-b"), ("ana", "bob"))
    sy(home, "quota", "set", "team-b", "--cpu", "1", "--memory", "1", "--instances", "1")

    # Ana sees her group, and nothing of team-b; she cannot change quotas.
    mine = sy(home, "quota", "show", "team-a", token=ana)
    assert mine["group"] == "team-a" and mine["limits"]["cpu"] == 2
    assert "team-b" in sy(home, "quota", "show", "team-b", token=ana, ok=False)
    assert [g["group"] for g in sy(home, "quota", "show", token=ana)] == ["team-a"]
    assert "admin" in sy(
        home,
        "quota",
        "set",
        "team-a",
        "--cpu",
        "9",
        "--memory",
        "9",
        "--instances",
        "9",
        token=ana,
        ok=False,
    )
    assert [g["group"] for g in sy(home, "quota", "show", token=bob)] == ["team-b"]

    # Without a valid token nothing answers.
    assert "unknown or revoked token" in sy(home, "quota", "show", token="sy_bogus", ok=False)
    bad_input = sy(
        home, "quota", "set", "Team A", "--cpu", "1", "--memory", "1", "--instances", "1", ok=False
    )
    assert "group" in bad_input and "not a valid name" in bad_input

    # Reservations through the Python client, as ana.
    from shipyard.client import Client, QuotaExceeded

    with Client(token=ana, home=home) as client:
        client.quota.reserve(
            "team-a",
            reservation_id="iris:1",
            deployment="iris",
            instance_type="cpu.small",
            instances=4,
        )
        with pytest.raises(
            QuotaExceeded,
            match=r"needs 0\.5 CPU, 1 GiB memory, 1 instance; "
            r"0 CPU, 0 GiB memory, 0 instances free",
        ):
            client.quota.reserve(
                "team-a",
                reservation_id="big:1",
                deployment="big",
                instance_type="cpu.small",
                instances=1,
            )

    # The audit trail and the projections' health.
    events = sy(home, "events", "list", "--service", "quota")
    types = [e["event_type"] for e in events["events"]]
    assert types.count("GroupQuotaSet") == 2 and "ResourcesReserved" in types
    reserved = next(e for e in events["events"] if e["event_type"] == "ResourcesReserved")
    assert reserved["metadata"]["actor"] == "ana"
    check = sy(home, "events", "replay", "usage", "--service", "quota", "--check")
    assert check["equal"] is True

    # Revoking ana's token locks her out (other services cache answers for 1 s).
    token_id = sy(home, "users", "whoami", token=ana)["token_id"]
    sy(home, "users", "revoke-token", "ana", token_id)
    wait_for_sync(
        lambda: (
            subprocess.run(
                [SHIPYARD, "--home", str(home), "--token", ana, "quota", "show", "team-a"],
                capture_output=True,
                timeout=60,
            ).returncode
            != 0
        ),
        timeout=15,
        message="a revoked token still works",
    )

    # Bob builds an image from the iris example; a second build is answered from the cache.
    iris = str(Path(__file__).resolve().parent.parent / "examples" / "iris")
    built = sy(home, "image", "build", iris, "--name", "iris", token=bob)
    assert built["build"]["state"] == "succeeded" and built["image"]["version"] == 1
    assert "scikit-learn" in {p["name"] for p in built["image"]["packages"]}
    again = sy(home, "image", "build", iris, "--name", "iris", token=bob)
    assert again["build"]["cache_hit"] is True and again["build"]["version"] == 1
    assert [i["name"] for i in sy(home, "image", "list", token=bob)] == ["iris"]
    assert sy(home, "image", "list", token=admin_token(home)) != []
    # nobody else in another group sees it
    carol = sy(home, "users", "create", "carol", "--group", "team-a")["token"]
    assert sy(home, "image", "list", token=carol) == []
    not_a_model = Path(tempfile.mkdtemp(prefix="shipyard-not-a-model-"))
    (not_a_model / "notes.txt").write_text("no serving script here")
    broken = sy(home, "image", "build", str(not_a_model), "--name", "nothing", token=bob, ok=False)
    shutil.rmtree(not_a_model)
    assert "serve.py" in broken

    # Bob deploys it and predicts through the gateway; carol (team-a) cannot touch it.
    created = sy(
        home,
        "deploy",
        "create",
        "iris-bob",
        "--image",
        "iris:1",
        "--instance-type",
        "cpu.small",
        "--replicas",
        "1",
        "--wait",
        token=bob,
    )
    assert created["status"] == "deployed" and created["ready_replicas"] == 1, created
    answer = sy(home, "predict", "iris-bob", "--data", "[[5.1, 3.5, 1.4, 0.2]]", token=bob)
    assert "setosa" in json.dumps(answer), answer
    assert "does not exist" in sy(home, "deploy", "show", "iris-bob", token=carol, ok=False)
    refused = sy(
        home, "predict", "iris-bob", "--data", "[[5.1, 3.5, 1.4, 0.2]]", token=carol, ok=False
    )
    assert "may not call deployment 'iris-bob'" in refused and "team-b" not in refused
    # The model server's output reaches the logging service; only bob's group reads it.
    logged = wait_for_sync(
        lambda: [
            ln for ln in sy_lines(home, "deploy", "logs", "iris-bob", token=bob) if "loaded" in ln
        ],
        timeout=30,
        interval=0.5,
        message="the model server's log never reached `shipyard deploy logs`",
        ignore=(AssertionError,),  # NOT_FOUND until the owner is projected
    )
    assert "serve.py" in logged[0], logged
    assert "does not exist" in sy(home, "deploy", "logs", "iris-bob", token=carol, ok=False)
    # The gateway's metrics reach the logging service: bob's 200 and carol's refusal.
    counted = wait_for_sync(
        lambda: sy(home, "deploy", "metrics", "iris-bob", token=bob)["total"]["requests"] == 2,
        timeout=30,
        interval=0.5,
        message="the gateway's metrics never reached `shipyard deploy metrics`",
    )
    assert counted
    total = sy(home, "deploy", "metrics", "iris-bob", token=bob)["total"]
    assert (total["status_2xx"], total["status_4xx"], total["status_5xx"]) == (1, 1, 0), total
    assert sy(home, "quota", "show", "team-b", token=bob)["used"]["instances"] == 1
    refused = sy(
        home,
        "deploy",
        "create",
        "iris-two",
        "--image",
        "iris:1",
        "--instance-type",
        "cpu.small",
        "--replicas",
        "1",
        token=bob,
        ok=False,
    )
    assert "team-b" in refused and "free" in refused, refused
    assert "image iris:1 is used by deployment(s) iris-bob" in sy(
        home, "image", "delete", "iris:1", "--yes", token=bob, ok=False
    )

    # A client system gets a key (Basic auth, as `curl -u`); revoking it locks it out
    # within a second. The REST facade shows bob his deployment.
    gateway = json.loads((home / "config.json").read_text())["endpoints"]["gateway_http"]
    key = sy(home, "keys", "create", "iris-bob", "--client", "crm", token=bob)
    secret = key["secret"]
    assert secret.startswith("sk_") and key["key"]["client"] == "crm"

    def call_as_crm() -> int:
        basic = base64.b64encode(f"crm:{secret}".encode()).decode()
        req = urllib.request.Request(
            f"{gateway}/deployments/iris-bob/predict",
            data=b"[[5.1, 3.5, 1.4, 0.2]]",
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    assert call_as_crm() == 200
    listed = urllib.request.Request(
        f"{gateway}/api/v1/deployments", headers={"Authorization": f"Bearer {bob}"}
    )
    with urllib.request.urlopen(listed, timeout=30) as resp:
        names = [d["name"] for d in json.loads(resp.read())["deployments"]]
    assert names == ["iris-bob"]

    def rest(path: str, token: str) -> tuple[int, dict[str, object]]:
        req = urllib.request.Request(
            f"{gateway}{path}", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return int(err.code), json.loads(err.read())

    # Logs and metrics over REST too, and as hidden from carol as over gRPC.
    status, logs = rest("/api/v1/deployments/iris-bob/logs?grep=loaded&limit=5", bob)
    assert status == 200 and any("serve.py" in str(ln) for ln in logs["lines"]), logs  # type: ignore[union-attr]
    status, metrics = rest("/api/v1/deployments/iris-bob/metrics", bob)
    assert status == 200 and int(metrics["total"]["requests"]) >= 2, metrics  # type: ignore[index]
    for path in ("logs", "metrics", "log-sources"):
        status, body = rest(f"/api/v1/deployments/iris-bob/{path}", carol)
        assert status == 404 and "team-b" not in json.dumps(body), (path, body)
    # An async prediction: 202 at once, then completed with the model's answer; carol
    # cannot see it.
    submit = urllib.request.Request(
        f"{gateway}/deployments/iris-bob/predict",
        data=b"[[5.1, 3.5, 1.4, 0.2]]",
        headers={"Authorization": f"Bearer {bob}", "X-Async-Request": "true"},
    )
    with urllib.request.urlopen(submit, timeout=30) as resp:
        assert resp.status == 202
        request_id = json.loads(resp.read())["request_id"]
    async_path = f"/deployments/iris-bob/async/{request_id}"
    wait_for_sync(
        lambda: rest(async_path, bob)[1].get("status") == "completed",
        timeout=60,
        interval=0.2,
        message="the async request did not complete",
    )
    assert rest(f"{async_path}/result", bob) == (200, ["setosa"])  # type: ignore[comparison-overlap]
    assert rest(async_path, carol)[0] == 404
    sy(home, "keys", "revoke", "iris-bob", "crm", token=bob)
    wait_for_sync(lambda: call_as_crm() == 401, timeout=5, message="a revoked key still works")

    # kill -9 of the scheduler: the model keeps serving, the supervisor restarts the
    # scheduler, which adopts the running instance instead of starting another.
    before = sy(home, "deploy", "instances", "iris-bob", token=bob)
    state = json.loads((home / "run" / "state.json").read_text())
    scheduler = next(c for c in state["components"] if c["name"] == "scheduler")
    os.kill(scheduler["pid"], 9)
    assert sy(home, "predict", "iris-bob", "--data", "[5.1, 3.5, 1.4, 0.2]", token=bob)
    wait_for_sync(
        lambda: sy(home, "deploy", "show", "iris-bob", token=bob)["status"] == "deployed",
        timeout=60,
        interval=0.2,
        message="the scheduler did not come back",
        ignore=(AssertionError,),  # unreachable while the supervisor restarts it
    )
    after = sy(home, "deploy", "instances", "iris-bob", token=bob)
    assert [i["instance_id"] for i in after if i["status"] == "ready"] == [
        i["instance_id"] for i in before if i["status"] == "ready"
    ]

    sy(home, "deploy", "stop", "iris-bob", token=bob)
    assert sy(home, "quota", "show", "team-b", token=bob)["used"]["instances"] == 0
    history = sy(home, "deploy", "history", "iris-bob", token=bob)
    assert [h["action"] for h in history][:2] == ["stop", "create"]

    # down, then up: every event and read model is still there.
    quota_events = len(sy(home, "events", "list", "--service", "quota")["events"])
    down(home)
    up(home)
    again = sy(home, "quota", "show", "team-a")
    assert again["used"]["cpu"] == 2 and again["limits"]["cpu"] == 2
    assert len(sy(home, "events", "list", "--service", "quota")["events"]) == quota_events
    assert "unknown or revoked token" in sy(home, "users", "whoami", token=ana, ok=False)
    stopped = sy(home, "deploy", "show", "iris-bob", token=bob)
    assert stopped["status"] == "stopped"

    # `down` stops model servers too (they outlive a scheduler crash, not a `down`).
    sy(home, "deploy", "start", "iris-bob", "--wait", token=bob)
    states = list((home / "runtime" / "instances").glob("*.json"))
    pids = [json.loads(p.read_text())["pid"] for p in states]
    assert pids and all(_alive(pid) for pid in pids)
    down(home)
    assert not any(_alive(pid) for pid in pids)
    up(home)
    sy(home, "deploy", "delete", "iris-bob", "--yes", token=bob)
    assert sy(home, "deploy", "list", token=bob) == []
