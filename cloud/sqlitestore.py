"""SQLite store (the default): WAL, synchronous=FULL, one connection, writers serialized.

One aiosqlite connection per process in autocommit mode; we issue ``BEGIN IMMEDIATE``
ourselves, so a second process (the CLI next to a running cloud) waits on ``busy_timeout``
instead of failing. An asyncio lock serializes this process's transactions on the connection.
"""

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

import aiosqlite

from cloud.schema import create as create_schema
from cloud.store import Row, placeholders

T = TypeVar("T")
BUSY_TIMEOUT_MS: Final = 10_000


class SqliteTx:
    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        cur = await self._conn.execute(sql, tuple(params))
        n = cur.rowcount
        await cur.close()
        return n

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        if rows:
            await self._conn.executemany(sql, [tuple(r) for r in rows])

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[object]]
    ) -> None:
        if rows:
            sql = (
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders(len(columns))})"
            )
            await self._conn.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        async with self._conn.execute(sql, tuple(params)) as cur:
            row: Row | None = await cur.fetchone()
            return row

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        async with self._conn.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())


class SqliteStore:
    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str) -> "SqliteStore":
        # Open it once without aiosqlite: when aiosqlite's own connect fails it stops its
        # worker thread with a future nobody awaits, and that thread then dies with "Event
        # loop is closed" on stderr. A file we cannot open raises sqlite3.Error here instead.
        await asyncio.to_thread(_probe, path)
        conn = await aiosqlite.connect(path, isolation_level=None)
        # From here every failure closes the connection: aiosqlite's worker thread is not a
        # daemon thread, so a connection left open (a file that is not a database fails the
        # first PRAGMA) kept the process alive after asyncio.run returned: it hung.
        store = cls(conn)
        try:
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=FULL",  # money: durable before any ack or receipt leaves
                f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
            ):
                await conn.execute(pragma)
            await store.transact(_create)
        except BaseException:
            await store.close()
            raise
        return store

    async def transact(self, fn: Callable[[SqliteTx], Awaitable[T]]) -> T:
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = await fn(SqliteTx(self._conn))
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")
            return result

    async def close(self) -> None:
        await self._conn.close()


def _probe(path: str) -> None:
    """Raise sqlite3.Error if ``path`` cannot be opened as a SQLite database."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA schema_version").fetchone()  # reads the header: "not a database"
    finally:
        conn.close()


async def _create(tx: SqliteTx) -> None:
    await create_schema(tx, blob="BLOB", integer="INTEGER")
