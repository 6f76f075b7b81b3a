"""The AsyncRequest aggregate's decisions, and the checked-in queue definition."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shipyard_asyncinference.adapters.queue import stream_config
from shipyard_asyncinference.domain import AsyncRequest
from shipyard_core.errors import FailedPrecondition

ROOT = Path(__file__).resolve().parents[3]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def queued(max_attempts: int = 3) -> AsyncRequest:
    agg = AsyncRequest("a" * 32)
    agg.queue(
        deployment="echo",
        group="team-a",
        caller="ana",
        protocol="raw",
        model_path="/predict",
        content_type="application/json",
        client_request_id="",
        payload_bytes=2,
        payload_sha256="0" * 64,
        payload_location="inline",
        max_attempts=max_attempts,
        at=T0,
        expires_at=T0 + timedelta(days=3),
    )
    return agg


def test_attempts_are_bounded_and_the_last_error_is_kept() -> None:
    agg = queued(max_attempts=2)
    assert agg.start("w", T0) == 1
    assert agg.attempt_failed(1, "boom", final=False, at=T0) is True
    assert agg.status == "queued" and agg.error == "boom"
    assert agg.start("w", T0) == 2
    assert agg.attempt_failed(2, "boom again", final=False, at=T0) is False
    assert agg.status == "failed"
    assert agg.error == "gave up after 2 attempts; last error: boom again"
    assert agg.start("w", T0) is None


def test_a_dead_worker_on_the_last_attempt_fails_the_request() -> None:
    agg = queued(max_attempts=1)
    assert agg.start("w1", T0) == 1
    # Redelivered after w1 died: nothing left to try.
    assert agg.start("w2", T0) is None
    assert agg.status == "failed" and "stopped before it ended" in agg.error


def test_a_result_is_written_once() -> None:
    agg = queued()
    assert agg.start("w1", T0) == 1
    assert agg.start("w2", T0) == 2  # a redelivery while w1 still runs
    fields = {
        "status": 200,
        "content_type": "application/json",
        "result_bytes": 2,
        "result_sha256": "0" * 64,
        "result_location": "inline",
        "at": T0,
    }
    assert agg.complete(1, **fields) is False  # w1's attempt is no longer the current one
    assert agg.complete(2, **fields) is True
    assert agg.complete(2, **fields) is False
    assert len([e for e in agg.pending if type(e).__name__ == "AsyncRequestCompleted"]) == 1


def test_only_queued_requests_can_be_cancelled_and_expiry_fails_unfinished_ones() -> None:
    agg = queued()
    agg.start("w", T0)
    with pytest.raises(FailedPrecondition, match="only a queued request"):
        agg.cancel("ana", T0)
    agg.expire(T0)
    assert agg.status == "failed" and agg.expired
    other = queued()
    other.cancel("ana", T0)
    assert other.status == "cancelled" and other.start("w", T0) is None


def test_checked_in_queue_stream_matches_the_code() -> None:
    checked_in = json.loads((ROOT / "infra/jetstream/async.json").read_text())
    assert checked_in == [json.loads(json.dumps(stream_config().as_dict()))]


def test_batch_locations_are_checked(tmp_path: Path) -> None:
    from shipyard_asyncinference.app.batch import Locations
    from shipyard_core.errors import InvalidArgument

    locations = Locations(tmp_path / "batch", frozenset({"allowed"}))
    assert locations.resolve("s3://allowed/in/", "input").prefix == "in/"
    inside = locations.resolve(f"file://{tmp_path}/batch/a/b/", "input")
    assert inside.prefix == "a/b/"
    for url, text in [
        ("s3://other/in/", "not open to batch jobs"),
        (f"file://{tmp_path}/batch/../secret/", "not under the batch folder"),
        ("ftp://x/", "not a batch location"),
    ]:
        with pytest.raises(InvalidArgument, match=text):
            locations.resolve(url, "input")


def test_input_formats() -> None:
    from shipyard_asyncinference.app.batch import payloads

    assert payloads("a.json", b'{"x": 1}') == ([b'{"x": 1}'], False)
    assert payloads("a.JSONL", b'{"x": 1}\n\n[2]\n') == ([b'{"x": 1}', b"[2]"], True)
    rows, lines = payloads("a.csv", b"a,b\n1,x\n2.5,\n")
    assert lines and [json.loads(r) for r in rows] == [{"a": 1, "b": "x"}, {"a": 2.5, "b": ""}]
    for key, data, text in [
        ("a.json", b"{", "not valid JSON"),
        ("a.jsonl", b'{"x": 1}\n{', "line 2: not valid JSON"),
        ("a.csv", b"a\n1,2\n", "more cells than columns"),
        ("a.parquet", b"x", "unsupported input format"),
        ("a.json", b"\xff", "not UTF-8"),
    ]:
        with pytest.raises(ValueError, match=text):
            payloads(key, data)
