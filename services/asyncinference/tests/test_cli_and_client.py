"""``shipyard predict --async [--wait]``, ``shipyard async list|status|result|cancel`` and
``client.async_requests`` against the real stack (gateway, service, worker process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from shipyard.cli.main import cli
from shipyard.client import Client, Conflict, NotFound
from shipyard_testing import wait_for

from .conftest import Stack

pytestmark = pytest.mark.timeout(120)


async def shipyard(stack: Stack, home: Path, *args: str, token: str = "ana-token") -> Result:
    """The CLI, off the event loop that serves the stack."""

    def invoke() -> Result:
        return CliRunner().invoke(
            cli,
            ["--home", str(home), "--token", token, *args],
            prog_name="shipyard",
            catch_exceptions=False,
            env={"SHIPYARD_GATEWAY_URL": stack.url},
        )

    return await asyncio.to_thread(invoke)


async def test_cli_predict_async_wait_and_follow_up(stack: Stack, tmp_path: Path) -> None:
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps({"tag": "cli"}))
    done = await shipyard(
        stack, tmp_path, "predict", "echo", "--data", f"@{payload}", "--async", "--wait", "--json"
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {"echo": {"tag": "cli"}, "user": "ana"}
    # The id goes to stderr, so the result alone is on stdout.
    assert done.stderr.startswith("async request ") and "accepted" in done.stderr

    submitted = await shipyard(
        stack, tmp_path, "predict", "echo", "-d", '{"tag": "cli-2"}', "--async"
    )
    assert submitted.exit_code == 0, submitted.output
    request_id = submitted.stdout.strip()
    assert len(request_id) == 32
    await stack.wait_status(request_id, "completed")
    status = await shipyard(stack, tmp_path, "async", "status", "echo", request_id, "--json")
    assert json.loads(status.stdout)["status"] == "completed"
    text = await shipyard(stack, tmp_path, "async", "status", "echo", request_id)
    assert "completed" in text.stdout and request_id in text.stdout
    result = await shipyard(stack, tmp_path, "async", "result", "echo", request_id, "--json")
    assert json.loads(result.stdout)["echo"] == {"tag": "cli-2"}

    async def listed() -> bool:
        out = await shipyard(stack, tmp_path, "async", "list", "echo", "--json")
        assert out.exit_code == 0, out.output
        return request_id in [r["request_id"] for r in json.loads(out.stdout)]

    # The list is the projection: it may trail the status by a moment.
    await wait_for(listed, timeout=10, interval=0.1, message="listed")
    table = await shipyard(stack, tmp_path, "async", "list", "echo", "--status", "completed")
    assert table.exit_code == 0 and "REQUEST ID" in table.stdout
    recent = await shipyard(stack, tmp_path, "async", "list", "echo", "--since", "1h", "--json")
    assert recent.exit_code == 0, recent.output
    assert request_id in [r["request_id"] for r in json.loads(recent.stdout)]
    future = await shipyard(
        stack, tmp_path, "async", "list", "echo", "--since", "2999-01-01T00:00Z", "--json"
    )
    assert future.exit_code == 0 and json.loads(future.stdout) == []
    bad = await shipyard(stack, tmp_path, "async", "list", "echo", "--since", "soon")
    assert bad.exit_code == 2 and "neither a duration" in bad.stderr
    # Another group cannot tell the deployment from one that does not exist.
    hidden = await shipyard(stack, tmp_path, "async", "list", "echo", token="bob-token")
    assert hidden.exit_code == 1 and "deployment 'echo' does not exist" in hidden.stderr
    cancel = await shipyard(stack, tmp_path, "async", "cancel", "echo", request_id)
    assert cancel.exit_code == 1
    assert cancel.stderr.startswith("error: ") and "only a queued request" in cancel.stderr
    # A request that fails makes --wait exit 1 with the reason.
    failed = await shipyard(
        stack,
        tmp_path,
        "predict",
        "echo",
        "-d",
        '{"tag": "cli-fail", "fail": true}',
        "--async",
        "--wait",
    )
    assert failed.exit_code == 1
    assert "failed: gave up after 3 attempts" in failed.stderr
    # bob sees nothing of it.
    other = await shipyard(
        stack, tmp_path, "async", "status", "echo", request_id, token="bob-token"
    )
    assert other.exit_code == 1 and "does not exist" in other.stderr


async def test_python_client(stack: Stack, tmp_path: Path) -> None:
    def session() -> dict[str, Any]:
        with Client(token="ana-token", home=tmp_path) as client:
            requests = client.async_requests
            submitted = requests.submit("echo", {"tag": "py"}, gateway_url=stack.url)
            final = requests.wait("echo", submitted.request_id, timeout=30, gateway_url=stack.url)
            result = requests.result("echo", submitted.request_id, gateway_url=stack.url)
            with pytest.raises(Conflict):
                requests.cancel("echo", submitted.request_id, gateway_url=stack.url)
            with pytest.raises(NotFound):
                requests.status("echo", "0" * 32, gateway_url=stack.url)
            return {"final": final, "result": result}

    out = await asyncio.to_thread(session)
    assert out["final"].status == "completed" and out["final"].attempts == 1
    assert out["final"].to_dict()["request_id"]
    assert out["result"] == {"echo": {"tag": "py"}, "user": "ana"}


async def test_cli_batch(stack: Stack, tmp_path: Path) -> None:
    source, target = stack.batch_root / "cli" / "in", stack.batch_root / "cli" / "out"
    source.mkdir(parents=True)
    for i in range(3):
        (source / f"{i}.json").write_text(json.dumps({"tag": f"cli-b{i}"}))
    (source / "bad.txt").write_text("x")
    created = await shipyard(
        stack,
        tmp_path,
        "batch",
        "create",
        "--deployment",
        "echo",
        "--input",
        f"file://{source}/",
        "--output",
        f"file://{target}/",
        "--wait",
        "--json",
    )
    assert created.exit_code == 0, created.output
    job = json.loads(created.stdout)
    assert (job["status"], job["total"], job["done"], job["failed"]) == ("completed", 4, 3, 1)
    assert job["failures"] == [
        {
            "key": "bad.txt",
            "reason": "unsupported input format: use .json, .jsonl (or .ndjson) or .csv",
        }
    ]
    listed = await shipyard(stack, tmp_path, "batch", "list", "--deployment", "echo", "--json")
    assert job["job_id"] in [j["job_id"] for j in json.loads(listed.stdout)]
    shown = await shipyard(
        stack, tmp_path, "batch", "status", "--deployment", "echo", job["job_id"]
    )
    assert shown.exit_code == 0 and "3/4" not in shown.stdout and "4/4 (1 failed)" in shown.stdout
    assert "bad.txt" in shown.stdout
    cancel = await shipyard(
        stack, tmp_path, "batch", "cancel", "--deployment", "echo", job["job_id"]
    )
    assert cancel.exit_code == 1 and "only a pending or running job" in cancel.stderr
