"""Which lot each request belongs to: ``asyncinference.request_lots``.

A request id is random (it is a public deployment's only credential for its result), so
it cannot name its lot; this table does. Its rows are written in the statement that
appends the lot's first event, so a request that exists always has one. A request
accepted before lots has none: it is its own lot (:class:`~shipyard_asyncinference.domain.
SingleRequest`).
"""

from __future__ import annotations

from collections.abc import Sequence

from shipyard_core.db import Conn
from shipyard_core.eventstore import RowsInsert

_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.request_lots (
    request_id text PRIMARY KEY,
    lot_id text NOT NULL
)
"""


async def ensure_membership_table(conn: Conn, schema: str) -> None:
    """Creates ``<schema>.request_lots`` if missing."""
    await conn.execute(_DDL.format(schema=schema))


class Membership:
    """Reads and writes ``request_lots``."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    def rows(self, lot_id: str, request_ids: Sequence[str]) -> RowsInsert:
        """The rows of a new lot, to write with its ``AsyncLotQueued``."""
        columns = (("request_id", "text"), ("lot_id", "text"))
        return RowsInsert(
            f"{self.schema}.request_lots", columns, [(rid, lot_id) for rid in request_ids]
        )

    async def lots_of(self, conn: Conn, request_ids: Sequence[str]) -> dict[str, str]:
        """The lot of each request (a request from before lots, or one that does not
        exist: its own id)."""
        rows = await conn.fetch(
            f"SELECT request_id, lot_id FROM {self.schema}.request_lots "
            "WHERE request_id = ANY($1::text[])",
            list(request_ids),
        )
        found = {row["request_id"]: row["lot_id"] for row in rows}
        return {rid: found.get(rid, rid) for rid in request_ids}
