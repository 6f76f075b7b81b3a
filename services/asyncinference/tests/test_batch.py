"""Batch jobs end to end: file:// prefixes, 100 objects with bad ones, kill -9 of the
runner mid-job and resume, cancel; the runner is the worker child process."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from shipyard_core.objectstore import open_store
from shipyard_testing import wait_for

from .conftest import Stack, auth, open_gate

pytestmark = pytest.mark.timeout(120)


def write(folder: Path, name: str, content: str | bytes) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


async def create(stack: Stack, source: Path, target: Path, token: str = "ana-token") -> str:
    async with stack.http.post(
        f"{stack.url}/deployments/echo/batch",
        json={"input": f"file://{source}/", "output": f"file://{target}/"},
        headers=auth(token),
    ) as r:
        body = await r.json()
        assert r.status == 201, body
        assert r.headers["Location"] == f"/deployments/echo/batch/{body['job_id']}"
        return str(body["job_id"])


async def job_status(stack: Stack, job_id: str, token: str = "ana-token") -> dict[str, Any]:
    async with stack.http.get(
        f"{stack.url}/deployments/echo/batch/{job_id}", headers=auth(token)
    ) as r:
        body: dict[str, Any] = await r.json()
        assert r.status == 200, body
        return body


async def wait_ended(stack: Stack, job_id: str, within: float = 60) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        body = await job_status(stack, job_id)
        return body if body["status"] in ("completed", "failed", "cancelled") else None

    return await wait_for(ended, timeout=within, interval=0.1, message=f"job {job_id} to end")


async def successes(stack: Stack, job_id: str) -> list[str]:
    events = await stack.service.service.store.read_stream(f"batch_job:{job_id}")
    return [e.payload["key"] for e in events if e.event_type == "BatchObjectSucceeded"]


async def test_batch_over_100_objects_with_bad_ones(stack: Stack) -> None:
    source, target = stack.batch_root / "t1" / "in", stack.batch_root / "t1" / "out"
    for i in range(94):
        write(source, f"good/{i:03}.json", json.dumps({"tag": f"b1-{i}", "n": i}))
    write(source, "bad/broken.json", "{not json")
    write(source, "bad/latin1.json", b"\xff\xfe")
    write(source, "bad/notes.txt", "hello")
    write(source, "bad/poison.json", json.dumps({"tag": "b1-poison", "fail": True}))
    write(source, "lines.jsonl", '{"tag": "l1"}\n\n{"tag": "l2"}\n{"tag": "l3"}\n')
    write(source, "rows.csv", "tag,x,y\nr1,1,2.5\nr2,3,oops\n")
    job_id = await create(stack, source, target)
    done = await wait_ended(stack, job_id)
    assert done["status"] == "completed", done
    assert (done["total"], done["done"], done["failed"]) == (100, 96, 4)
    reasons = {f["key"]: f["reason"] for f in done["failures"]}
    assert set(reasons) == {
        "bad/broken.json",
        "bad/latin1.json",
        "bad/notes.txt",
        "bad/poison.json",
    }
    assert "not valid JSON" in reasons["bad/broken.json"]
    assert "not UTF-8" in reasons["bad/latin1.json"]
    assert "unsupported input format" in reasons["bad/notes.txt"]
    assert "the model answered 500" in reasons["bad/poison.json"]
    out = json.loads((target / "good/007.json.out").read_text())
    assert out == {"echo": {"tag": "b1-7", "n": 7}, "user": "ana"}
    assert len(list((target / "good").iterdir())) == 94
    assert not (target / "bad").exists()
    lines = [json.loads(x) for x in (target / "lines.jsonl.out").read_text().splitlines()]
    assert [x["echo"]["tag"] for x in lines] == ["l1", "l2", "l3"]
    rows = [json.loads(x) for x in (target / "rows.csv.out").read_text().splitlines()]
    assert [x["echo"] for x in rows] == [
        {"tag": "r1", "x": 1, "y": 2.5},
        {"tag": "r2", "x": 3, "y": "oops"},
    ]
    # Listed for ana, invisible to bob.
    async with stack.http.get(
        f"{stack.url}/deployments/echo/batch", headers=auth("ana-token")
    ) as r:
        assert job_id in [j["job_id"] for j in (await r.json())["jobs"]]
    async with stack.http.get(
        f"{stack.url}/deployments/echo/batch/{job_id}", headers=auth("bob-token")
    ) as r:
        assert r.status == 404


async def test_batch_resumes_after_kill_9_without_redoing_finished_objects(
    stack: Stack, gate: Path
) -> None:
    source, target = stack.batch_root / "t2" / "in", stack.batch_root / "t2" / "out"
    for i in range(10):
        write(source, f"a-{i:02}.json", json.dumps({"tag": f"b2-a{i}"}))
    for i in range(10):
        write(source, f"z-{i:02}.json", json.dumps({"tag": f"b2-z{i}", "wait_for": str(gate)}))
    job_id = await create(stack, source, target)

    async def first_ten() -> bool:
        return len(await successes(stack, job_id)) >= 10

    await wait_for(first_ten, timeout=30, interval=0.05, message="the ungated objects")
    await wait_for(lambda: "b2-z0" in stack.model.calls(), timeout=10, message="held")
    stack.worker.kill9()
    stack.worker.start()
    open_gate(gate)
    done = await wait_ended(stack, job_id)
    assert done["status"] == "completed", done
    assert (done["total"], done["done"], done["failed"]) == (20, 20, 0)
    keys = await successes(stack, job_id)
    assert sorted(keys) == sorted(f"{p}-{i:02}.json" for p in "az" for i in range(10))
    assert len(keys) == len(set(keys))  # each object recorded once
    calls = stack.model.calls()
    assert all(calls.count(f"b2-a{i}") == 1 for i in range(10))  # finished ones not redone
    assert len(list(target.iterdir())) == 20


async def test_cancel_a_running_batch(stack: Stack, gate: Path) -> None:
    source, target = stack.batch_root / "t3" / "in", stack.batch_root / "t3" / "out"
    for i in range(6):
        write(source, f"{i}.json", json.dumps({"tag": f"b3-{i}", "wait_for": str(gate)}))
    job_id = await create(stack, source, target)
    await wait_for(lambda: "b3-0" in stack.model.calls(), timeout=20, message="started")
    async with stack.http.delete(
        f"{stack.url}/deployments/echo/batch/{job_id}", headers=auth("ana-token")
    ) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["status"] == "cancelled"
    open_gate(gate)
    async with stack.http.post(
        f"{stack.url}/deployments/echo/batch/{job_id}/cancel", headers=auth("ana-token")
    ) as r:
        assert r.status == 409
    # The runner stops: the objects in flight record nothing, the rest never start.
    await wait_for(
        lambda: stack.model.calls().count("b3-1") >= 1, timeout=10, message="in flight done"
    )
    body = await job_status(stack, job_id)
    assert body["status"] == "cancelled" and body["done"] == 0
    assert "b3-5" not in stack.model.calls()


async def test_batch_refusals(stack: Stack) -> None:
    url = f"{stack.url}/deployments/echo/batch"
    inside = stack.batch_root / "t4"
    for document, status, text in [
        ({"input": "file:///etc/", "output": f"file://{inside}/out/"}, 400, "not under"),
        ({"input": f"file://{inside}/", "output": f"file://{inside}/out/"}, 400, "overlaps"),
        ({"input": "http://x/in/", "output": f"file://{inside}/o/"}, 400, "not a batch"),
        ({"input": "file:///x/"}, 400, "needs the input and output"),
    ]:
        async with stack.http.post(url, json=document, headers=auth("ana-token")) as r:
            assert r.status == status, document
            assert text in (await r.json())["error"], document
    async with stack.http.post(
        url,
        json={"input": f"file://{inside}/i/", "output": f"file://{inside}/o/"},
        headers=auth("bob-token"),
    ) as r:
        assert r.status == 403


async def test_batch_over_s3_prefixes(stack: Stack, moto_endpoint: str) -> None:
    import boto3

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    store = open_store(f"s3://{bucket}", endpoint_url=moto_endpoint)
    for i in range(5):
        await store.put_bytes(f"in/part/{i}.json", json.dumps({"tag": f"s3-{i}"}).encode())
    await store.put_bytes("in/rows.jsonl", b'{"tag": "s3-l1"}\n{"tag": "s3-l2"}\n')
    async with stack.http.post(
        f"{stack.url}/deployments/echo/batch",
        json={"input": f"s3://{bucket}/in/", "output": f"s3://{bucket}/out/"},
        headers=auth("ana-token"),
    ) as r:
        assert r.status == 201, await r.text()
        job_id = (await r.json())["job_id"]
    done = await wait_ended(stack, job_id)
    assert (done["status"], done["total"], done["done"]) == ("completed", 6, 6), done
    assert sorted(await store.list("out/")) == sorted(
        [f"out/part/{i}.json.out" for i in range(5)] + ["out/rows.jsonl.out"]
    )
    answer = json.loads(await store.get_bytes("out/part/3.json.out"))
    assert answer == {"echo": {"tag": "s3-3"}, "user": "ana"}
