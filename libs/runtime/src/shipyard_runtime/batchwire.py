"""The wire format of several predictions in one HTTP exchange (``POST /shipyard/batch``).

A body is one JSON line, ``{"parts": [{...head, "length": n}, ...]}``, then the parts'
bodies back to back, each ``length`` bytes: no base64, no escaping, whatever the bodies
hold. A request part's head says where it goes (``path``) and with which ``headers``; an
answer part's head has its ``status`` and ``content_type``. Zero dependencies: the model
server, the gateway and the async workers all speak it (decision 0035).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PATH = "/shipyard/batch"
"""The model server's batch route."""
CONTENT_TYPE = "application/x-shipyard-batch"


@dataclass(frozen=True, slots=True)
class Part:
    """One request or answer of a batch: its head (JSON values) and its body."""

    head: dict[str, Any]
    body: bytes


def encode(parts: Sequence[Part]) -> bytes:
    """The body carrying ``parts``, in order."""
    heads = [{**part.head, "length": len(part.body)} for part in parts]
    header = json.dumps({"parts": heads}, separators=(",", ":")).encode()
    return b"".join([header, b"\n", *(part.body for part in parts)])


def decode(data: bytes) -> list[Part]:
    """The parts of a body; ``ValueError`` naming what is wrong when it is malformed."""
    end = data.find(b"\n")
    if end < 0:
        raise ValueError("a batch body starts with a JSON line of its parts; no line found")
    try:
        heads = json.loads(data[:end])["parts"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ValueError(f'the first line is not {{"parts": [...]}}: {exc}') from exc
    if not isinstance(heads, list):
        raise ValueError('"parts" must be a list')
    parts = []
    offset = end + 1
    for i, head in enumerate(heads):
        length = head.get("length") if isinstance(head, dict) else None
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"part {i}: its head needs a length (bytes of its body)")
        if offset + length > len(data):
            raise ValueError(f"part {i}: {length} bytes announced, {len(data) - offset} left")
        parts.append(Part(head, data[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} bytes after the last part")
    return parts
