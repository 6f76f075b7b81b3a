"""The LOGS message format: lines cut from bytes the same way every time, kept safely."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shipyard_core.logbatch import MAX_LINE_BYTES, Line, LogBatch, split_lines

AT = datetime(2026, 11, 22, 8, 0, 0, 123456, tzinfo=UTC)


def test_whole_lines_only_until_the_writer_is_done() -> None:
    lines, end = split_lines(b"one\ntwo\r\nthr", 100, AT)
    assert [(ln.offset, ln.text) for ln in lines] == [(100, "one"), (104, "two")]
    assert end == 109  # "thr" waits for its newline
    lines, end = split_lines(b"thr", 109, AT, final=True)
    assert [(ln.offset, ln.text) for ln in lines] == [(109, "thr")] and end == 112


def test_long_lines_are_cut_into_pieces_at_the_same_offsets_every_time() -> None:
    data = b"a" * MAX_LINE_BYTES + b"\n" + b"b" * (MAX_LINE_BYTES * 2 + 5) + b"\nc\n"
    lines, end = split_lines(data, 0, AT)
    assert end == len(data)
    assert [(len(ln.text), ln.cut) for ln in lines] == [
        (MAX_LINE_BYTES, False),  # exactly the limit plus its newline is one line
        (MAX_LINE_BYTES, True),
        (MAX_LINE_BYTES, True),
        (5, False),
        (1, False),
    ]
    # Reading from any line start again gives the same lines (a re-sent batch dedupes).
    again, _ = split_lines(data[lines[2].offset :], lines[2].offset, AT)
    assert again == lines[2:]
    # An unterminated piece of exactly the limit waits: its newline may come next.
    assert split_lines(b"d" * MAX_LINE_BYTES, 0, AT) == ([], 0)


def test_invalid_utf8_and_nul_become_replacement_characters() -> None:
    lines, _ = split_lines(b"ok \xff\xfe\x00 end\n", 0, AT)
    assert lines[0].text == "ok \ufffd\ufffd\ufffd end"


def test_a_batch_round_trips_and_names_its_range() -> None:
    batch = LogBatch(
        "instance",
        "iris-r1-abcde",
        "iris",
        1,
        "output",
        0,
        9,
        [Line(0, AT, "é\ufffd"), Line(4, AT, "x", cut=True)],
    )
    assert LogBatch.decode(batch.encode()) == batch
    assert batch.subject == "logs.instance.iris.iris-r1-abcde"
    assert batch.msg_id == "iris-r1-abcde:0-9"


def test_lone_surrogates_and_nul_from_a_message_are_made_storable() -> None:
    body = (
        b'{"v":1,"kind":"instance","source":"s","deployment":"d","revision":1,'
        b'"stream":"output","start":0,"end":3,"lines":[[0,0,"a\\ud800\\u0000b",false]]}'
    )
    text = LogBatch.decode(body).lines[0].text
    text.encode("utf-8")
    assert "\x00" not in text


@pytest.mark.parametrize(
    "body", [b"", b"[]", b'{"v":2}', b'{"v":1,"kind":"pod","stream":"output"}', b"\xff"]
)
def test_anything_else_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match="log batch"):
        LogBatch.decode(body)
