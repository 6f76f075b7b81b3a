"""Where payloads and results live: small ones in ``asyncinference.blobs`` (written in
the transaction that appends the event naming them), large ones in the object store
(written before that transaction, under a key unique to the attempt, so a losing writer
never overwrites the winner's result; its object is deleted again)."""

from __future__ import annotations

from collections.abc import Sequence

from shipyard_asyncinference.domain import INLINE, OBJECT_PREFIX
from shipyard_core.db import Conn
from shipyard_core.errors import NotFound
from shipyard_core.eventstore import RowsInsert
from shipyard_core.objectstore import ObjectStore

PAYLOAD = "payload"
RESULT = "result"

_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.blobs (
    request_id text NOT NULL,
    kind text NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (request_id, kind)
)
"""


async def ensure_blobs_table(conn: Conn, schema: str) -> None:
    """Creates ``<schema>.blobs`` if missing."""
    await conn.execute(_DDL.format(schema=schema))


class Blobs:
    """Payloads and results of async requests."""

    def __init__(self, schema: str, objects: ObjectStore, inline_max_bytes: int) -> None:
        self.schema = schema
        self.objects = objects
        self.inline_max_bytes = inline_max_bytes

    def key(self, request_id: str, kind: str, attempt: int = 0) -> str:
        """The object key of a large payload or result."""
        suffix = f"-{attempt}" if attempt else ""
        return f"async/{request_id}/{kind}{suffix}"

    async def stage(self, request_id: str, kind: str, body: bytes, attempt: int = 0) -> str:
        """Stores ``body`` in the object store when it is large and returns its location
        (``inline`` for a small one: :meth:`inline_rows` stores it with the event)."""
        if len(body) <= self.inline_max_bytes:
            return INLINE
        key = self.key(request_id, kind, attempt)
        await self.objects.put_bytes(key, body)
        return OBJECT_PREFIX + key

    def inline_rows(self, kind: str, rows: Sequence[tuple[str, str, bytes]]) -> list[RowsInsert]:
        """The small bodies of ``(request_id, location, body)`` rows (those whose location
        is ``inline``), to write with the event naming them (``Repository.save(rows=)``:
        in its statement, so a conflict writes nothing)."""
        inline = [(rid, kind, body) for rid, location, body in rows if location == INLINE]
        if not inline:
            return []
        columns = (("request_id", "text"), ("kind", "text"), ("body", "bytea"))
        return [RowsInsert(f"{self.schema}.blobs", columns, inline)]

    async def discard(self, location: str) -> None:
        """Deletes a staged object that no event names (a lost race, a failed append)."""
        if location.startswith(OBJECT_PREFIX):
            await self.objects.delete(location[len(OBJECT_PREFIX) :], missing_ok=True)

    async def read_inline(self, conn: Conn, request_id: str, kind: str) -> bytes | None:
        """The body stored inline, or None (stored in the object store, or removed)."""
        body = await conn.fetchval(
            f"SELECT body FROM {self.schema}.blobs WHERE request_id = $1 AND kind = $2",
            request_id,
            kind,
        )
        return None if body is None else bytes(body)

    async def read_inline_many(
        self, conn: Conn, request_ids: Sequence[str], kind: str
    ) -> dict[str, bytes]:
        """The bodies stored inline of several requests (those stored elsewhere, or
        removed, are missing)."""
        rows = await conn.fetch(
            f"SELECT request_id, body FROM {self.schema}.blobs "
            "WHERE request_id = ANY($1::text[]) AND kind = $2",
            list(request_ids),
            kind,
        )
        return {row["request_id"]: bytes(row["body"]) for row in rows}

    async def read(self, conn: Conn, request_id: str, kind: str, location: str) -> bytes:
        """The stored body; NotFound when it was removed."""
        if location.startswith(OBJECT_PREFIX):
            return await self.objects.get_bytes(location[len(OBJECT_PREFIX) :])
        body = await self.read_inline(conn, request_id, kind)
        if body is None:
            raise NotFound(f"the {kind} of async request {request_id} was removed")
        return body

    async def remove(self, conn: Conn, request_ids: Sequence[str], locations: list[str]) -> None:
        """Removes every stored body of some requests (expiry); ``locations``: those in
        the object store."""
        for location in locations:
            await self.discard(location)
        await conn.execute(
            f"DELETE FROM {self.schema}.blobs WHERE request_id = ANY($1::text[])",
            list(request_ids),
        )
