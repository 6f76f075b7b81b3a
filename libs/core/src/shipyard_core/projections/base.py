"""What a projection is: tables, the events it follows, and a pure handler.

A handler turns one event into SQL statements and does no I/O itself. That keeps it
deterministic (replay must rebuild exactly the live table), lets the runner batch the
statements of many events into one pipelined round trip, and lets replay write the
same statements into fresh tables."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from shipyard_core.db import Conn
from shipyard_core.eventstore import StoredEvent, Upcasters, validate_identifier


@dataclass(frozen=True)
class Statement:
    """One SQL write. ``sql`` names tables as ``{logical_name}`` placeholders."""

    sql: str
    args: tuple[Any, ...] = ()


class Tables:
    """Logical table name → the real, schema-qualified one (live or rebuild)."""

    def __init__(self, schema: str, names: Iterable[str], suffix: str = "") -> None:
        self.schema = schema
        self.suffix = suffix
        self.mapping = {name: f"{schema}.{name}{suffix}" for name in names}

    def __getitem__(self, name: str) -> str:
        return self.mapping[name]

    def render(self, sql: str) -> str:
        """Fills the ``{name}`` placeholders."""
        return sql.format(**self.mapping)


class Projection(ABC):
    """Subclass with a name, the schema its tables live in, the (service, aggregate)
    streams it follows, and its tables' column definitions."""

    name: ClassVar[str]
    schema: ClassVar[str]
    sources: ClassVar[tuple[tuple[str, str], ...]]
    # logical table name -> column list for CREATE TABLE (...)
    tables: ClassVar[dict[str, str]]
    # secondary indexes: (logical table name, comma-separated columns)
    indexes: ClassVar[tuple[tuple[str, str], ...]] = ()
    upcasters: ClassVar[Upcasters] = Upcasters()

    @abstractmethod
    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        """The writes one event causes. Pure: only the event, no clock, no reads."""

    @classmethod
    def subjects(cls) -> list[str]:
        """The JetStream filter subjects of the followed streams."""
        return [f"events.{svc}.{agg}.*" for svc, agg in cls.sources]

    @classmethod
    def live_tables(cls) -> Tables:
        """The tables queries read."""
        return Tables(validate_identifier(cls.schema), cls.tables)

    @classmethod
    async def create_tables(cls, conn: Conn, tables: Tables | None = None) -> None:
        """Creates the projection's tables if missing."""
        tables = tables or cls.live_tables()
        for name, columns in cls.tables.items():
            validate_identifier(name)
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {tables[name]} ({columns})")
        for table, columns in cls.indexes:
            name = index_name(table, columns, tables.suffix)
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {tables[table]} ({columns})")


def index_name(table: str, columns: str, suffix: str = "") -> str:
    """A stable index name, so that start-up's IF NOT EXISTS finds it again."""
    cols = "_".join(c.strip().split()[0] for c in columns.split(","))
    return validate_identifier(f"{table}{suffix}__{cols}"[:63])


def group_statements(statements: Iterable[Statement]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """Consecutive statements with the same SQL, merged for ``executemany`` (order kept)."""
    groups: list[tuple[str, list[tuple[Any, ...]]]] = []
    for st in statements:
        if groups and groups[-1][0] == st.sql:
            groups[-1][1].append(st.args)
        else:
            groups.append((st.sql, [st.args]))
    return groups


async def execute_statements(conn: Conn, statements: Iterable[Statement], tables: Tables) -> None:
    """Runs statements in order, pipelining runs of the same SQL."""
    for sql, rows in group_statements(statements):
        rendered = tables.render(sql)
        if len(rows) == 1:
            await conn.execute(rendered, *rows[0])
        else:
            await conn.executemany(rendered, rows)
