"""The cloud's store interface: one transaction at a time over a small SQL dialect.

The cloud's modules (registry, leases, ingest, ledger) speak plain SQL that SQLite and
PostgreSQL both accept: ``?`` placeholders (translated to ``$n`` for asyncpg), ``INSERT ...
ON CONFLICT DO NOTHING``, ``CASE`` instead of ``MAX(a, b)``/``GREATEST``, every ``SUM`` wrapped
in ``CAST(COALESCE(SUM(x), 0) AS BIGINT)`` so both return an int. A store runs a whole unit of
work with ``transact(fn)``: SQLite serializes writers (one connection, ``BEGIN IMMEDIATE``);
PostgreSQL runs it SERIALIZABLE and re-runs ``fn`` on a serialization failure, so ``fn`` must
have no effect outside the transaction (it only reads and writes through ``tx``).
"""

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

from protocol.errors import FogpayError

T = TypeVar("T")
Row = Sequence[Any]

# Chunk size for ``IN (...)`` lists: far below SQLite's and PostgreSQL's parameter limits.
IN_LIST_ITEMS_MAX: Final = 500
# BIGINT is signed: wire times are uint64, so times are clamped when stored (any real time
# is far below), and sequence numbers are stored as 8 big-endian bytes.
INT63_MAX: Final = 2**63 - 1


class StoreConflict(FogpayError):
    """A transaction kept conflicting with concurrent ones and was given up; nothing was
    written. The caller may retry later (a fog resends an unacked batch on its own)."""


class Tx(Protocol):
    dialect: str

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[object]]
    ) -> None:
        """INSERT ``rows`` into ``table`` (a duplicate key fails like an INSERT's): SQLite
        runs one prepared INSERT per row, PostgreSQL a binary COPY (a fraction of the
        server's CPU per row). ``table`` and ``columns`` are the code's, never input."""
        ...

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> Row | None: ...

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...


class Store(Protocol):
    dialect: str

    async def transact(self, fn: Callable[[Tx], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction (committed durably before this returns)."""
        ...

    async def close(self) -> None: ...


def clamp_ms(value: int) -> int:
    """A uint64 from the wire (a time, a batch number) as a BIGINT: values above 2^63-1 mean
    "never" for every comparison the cloud makes."""
    return min(value, INT63_MAX)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def placeholders(n: int) -> str:
    assert 1 <= n <= IN_LIST_ITEMS_MAX
    return ",".join("?" * n)


def chunks(items: Sequence[T]) -> list[Sequence[T]]:
    return [items[i : i + IN_LIST_ITEMS_MAX] for i in range(0, len(items), IN_LIST_ITEMS_MAX)]


async def fetch_in(
    tx: Tx, sql: str, items: Sequence[object], *, pg_array: bool = False
) -> list[Row]:
    """Run ``sql`` (containing one ``IN ({in})``) over ``items`` in chunks of
    ``IN_LIST_ITEMS_MAX`` placeholders. ``pg_array``: on PostgreSQL, one ``= ANY(?)`` over
    an array instead, for an index lookup by many keys (a statement prepared once; 500
    placeholders are planned anew at every call, ~4x the server's CPU per key). Not for a
    table the planner scans: it compares each row with the whole array, unhashed."""
    if pg_array and tx.dialect == "postgresql":
        assert sql.count(" IN ({in})") == 1, sql
        return await tx.fetchall(sql.replace(" IN ({in})", " = ANY(?)"), (list(items),))
    rows: list[Row] = []
    for part in chunks(list(items)):
        rows.extend(await tx.fetchall(sql.replace("{in}", placeholders(len(part))), part))
    return rows
